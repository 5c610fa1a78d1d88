"""The import rules of DESIGN.md ("Layout and ownership"), checked on the source with `ast`.

Lower layers never import higher ones: the sans-IO engine in `pqproxy/tls/` knows nothing of
sockets, event loops, backends or metrics; a crypto backend never imports the engine or I/O;
pyOpenSSL is a test/bench peer only. One test per (rule, file), so a failure names both, and
its message names the import and its line.

Every `import`, `from … import` (relative ones resolved) and `importlib.import_module("…")` /
`__import__("…")` with a literal name counts, wherever it is: inside a function, or under
`if TYPE_CHECKING:`, too.
"""

from __future__ import annotations

import ast
import functools
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
PACKAGE = "pqproxy"
PACKAGE_DIR = REPO_ROOT / PACKAGE


@dataclass(frozen=True)
class Rule:
    id: str
    why: str
    scope: tuple[str, ...]  # modules (and their submodules) the rule applies to
    forbidden: tuple[str, ...]  # modules (and their submodules) they may not import
    allowed: tuple[str, ...] = ()  # exceptions inside `forbidden`
    exempt: tuple[str, ...] = ()  # modules in `scope` the rule does not apply to

    def applies_to(self, module: str) -> bool:
        return _under(module, self.scope) and not _under(module, self.exempt)

    def forbids(self, target: str) -> bool:
        return _under(target, self.forbidden) and not _under(target, self.allowed)


def _under(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


RULES: tuple[Rule, ...] = (
    Rule(
        id="tls-is-sans-io",
        why="pqproxy/tls/ is a sans-IO engine: no event loop, sockets, backends, metrics or CLI",
        scope=("pqproxy.tls",),
        forbidden=(
            "asyncio",
            "uvloop",
            "socket",
            "selectors",
            "ssl",
            "prometheus_client",
            "pqproxy.io",
            "pqproxy.relay",
            "pqproxy.crypto.backends",
            "pqproxy.metrics",
            "pqproxy.cli",
            "pqproxy.__main__",
        ),
    ),
    Rule(
        id="tls-sees-only-crypto-provider",
        why="pqproxy/tls/ talks to crypto through the protocols in pqproxy/crypto/provider.py only",
        scope=("pqproxy.tls",),
        forbidden=("pqproxy.crypto",),
        allowed=("pqproxy.crypto.provider",),
    ),
    Rule(
        id="hello-checks-are-pure",
        why="pqproxy/tls/hello_checks.py is pure functions over a parsed ClientHello: it "
        "never reaches back into the state machine that calls it, nor below the engine",
        scope=("pqproxy.tls.hello_checks",),
        forbidden=("pqproxy.tls.server", "pqproxy.tls.record", "pqproxy.tls.key_schedule"),
    ),
    Rule(
        id="relay-is-sans-io",
        why="pqproxy/relay/ is the HTTP rules as pure functions over h11 and TLS events: the "
        "sockets, event loop, clock and metrics that drive it live in pqproxy/io/",
        scope=("pqproxy.relay",),
        forbidden=(
            "asyncio",
            "uvloop",
            "socket",
            "selectors",
            "ssl",
            "prometheus_client",
            "pqproxy.io",
            "pqproxy.crypto.backends",
            "pqproxy.metrics",
            "pqproxy.cli",
            "pqproxy.__main__",
        ),
    ),
    Rule(
        id="relay-fields-is-the-base",
        why="pqproxy/relay/fields.py (header types, hop-by-hop, transfer-coding lists) is what "
        "both directions share: it imports no other relay module",
        scope=("pqproxy.relay.fields",),
        forbidden=("pqproxy.relay",),
        allowed=("pqproxy.relay.fields",),
    ),
    Rule(
        id="relay-request-side-below-forwarding",
        why="the request rules (errors, request, body, identity) decide what a client may send; "
        "they never import the upstream-facing forwarding or response rules",
        scope=(
            "pqproxy.relay.errors",
            "pqproxy.relay.request",
            "pqproxy.relay.body",
            "pqproxy.relay.identity",
        ),
        forbidden=("pqproxy.relay.forwarding", "pqproxy.relay.response"),
    ),
    Rule(
        id="backend-below-engine",
        why="a crypto backend supplies primitives; it never imports the TLS engine, I/O or relay",
        scope=("pqproxy.crypto.backends",),
        forbidden=(
            "pqproxy.tls.server",
            "pqproxy.tls.client",
            "pqproxy.io",
            "pqproxy.relay",
            "pqproxy.cli",
        ),
    ),
    Rule(
        id="crypto-asyncio-only-in-offload",
        why="how a backend call runs (inline, pool, batch) is decided in crypto/offload.py alone",
        scope=("pqproxy.crypto",),
        exempt=("pqproxy.crypto.offload",),
        forbidden=("asyncio", "uvloop"),
    ),
    Rule(
        id="metrics-defines-only",
        why="pqproxy/metrics.py defines metrics on prometheus_client alone; it imports nothing "
        "of pqproxy, so every layer allowed to count can use it",
        scope=("pqproxy.metrics",),
        forbidden=(PACKAGE, "asyncio", "uvloop", "socket"),
    ),
    Rule(
        id="prometheus-only-in-metrics",
        why="only pqproxy/metrics.py imports prometheus_client: names, labels, buckets and the "
        "multiprocess mode are decided in one place",
        scope=(PACKAGE,),
        exempt=("pqproxy.metrics",),
        forbidden=("prometheus_client",),
    ),
    Rule(
        id="no-pyopenssl",
        why="pyOpenSSL (OpenSSL) is an independent test/bench peer, never a pqproxy dependency",
        scope=(PACKAGE,),
        # The load tester's client is pyOpenSSL by design: an implementation independent of
        # the server it measures (pqproxy.bench.cli imports it only when a bench runs).
        exempt=("pqproxy.bench",),
        forbidden=("OpenSSL",),
    ),
)
RULES_BY_ID = {rule.id: rule for rule in RULES}


# --- the checker ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Import:
    lineno: int
    target: str  # absolute dotted module name


def module_name(path: Path, root: Path = REPO_ROOT) -> tuple[str, bool]:
    """`pqproxy/tls/server.py` -> ("pqproxy.tls.server", False); `…/__init__.py` -> (pkg, True)."""
    parts = list(path.relative_to(root).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    if is_package:
        parts.pop()
    return ".".join(parts), is_package


def resolve_from(module: str, is_package: bool, level: int, name: str | None) -> str:
    """The absolute module of `from <level dots><name> import …` written in `module`."""
    if level == 0:
        assert name is not None
        return name
    package = module.split(".") if is_package else module.split(".")[:-1]
    if level - 1 >= len(package):
        raise ValueError(f"relative import beyond the top-level package in {module}")
    base = package[: len(package) - (level - 1)]
    return ".".join([*base, name] if name else base)


def _dynamic_import_name(node: ast.Call) -> str | None:
    func = node.func
    callee = func.id if isinstance(func, ast.Name) else getattr(func, "attr", None)
    if callee not in ("import_module", "__import__") or not node.args:
        return None
    first = node.args[0]
    if isinstance(first, ast.Constant) and isinstance(first.value, str):
        return first.value
    return None


def find_imports(
    source: str, module: str, is_package: bool, known_modules: frozenset[str]
) -> Iterator[Import]:
    """Every module that `source` (the text of `module`) imports.

    `from pkg import name` imports `pkg.name` when that is a module of the project, else `pkg`.
    """
    tree = ast.parse(source, filename=module)
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield Import(node.lineno, alias.name)
        elif isinstance(node, ast.ImportFrom):
            base = resolve_from(module, is_package, node.level, node.module)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                yield Import(node.lineno, sub if sub in known_modules else base)
        elif isinstance(node, ast.Call):
            name = _dynamic_import_name(node)
            if name is not None:
                yield Import(node.lineno, name)


def violations(
    rule: Rule, source: str, module: str, is_package: bool, known_modules: frozenset[str]
) -> list[Import]:
    if not rule.applies_to(module):
        return []
    found = find_imports(source, module, is_package, known_modules)
    return [imp for imp in found if rule.forbids(imp.target)]


# --- the project's files --------------------------------------------------------------------


def _source_files() -> list[Path]:
    return sorted(p for p in PACKAGE_DIR.rglob("*.py") if "__pycache__" not in p.parts)


@functools.cache
def _known_modules() -> frozenset[str]:
    names = {module_name(p)[0] for p in _source_files()}
    names |= {module_name(d / "__init__.py")[0] for d in PACKAGE_DIR.rglob("*") if d.is_dir()}
    return frozenset(names)


def _cases() -> list[tuple[Rule, str]]:
    cases: list[tuple[Rule, str]] = []
    for path in _source_files():
        module, _ = module_name(path)
        rel = path.relative_to(REPO_ROOT).as_posix()
        cases.extend((rule, rel) for rule in RULES if rule.applies_to(module))
    return cases


@pytest.mark.parametrize(
    ("rule_id", "rel_path"), [pytest.param(r.id, p, id=f"{r.id}:{p}") for r, p in _cases()]
)
def test_import_rule(rule_id: str, rel_path: str) -> None:
    rule = RULES_BY_ID[rule_id]
    path = REPO_ROOT / rel_path
    module, is_package = module_name(path)
    found = violations(rule, path.read_text(encoding="utf-8"), module, is_package, _known_modules())
    if found:
        lines = [f"  {rel_path}:{imp.lineno} imports {imp.target}" for imp in found]
        pytest.fail("\n".join([f"{rule.id}: {rule.why}", *lines]), pytrace=False)


def test_the_checker_sees_the_package() -> None:
    modules = {module_name(p)[0] for p in _source_files()}
    assert "pqproxy" in modules
    assert any(m.startswith("pqproxy.tls.") for m in modules), "no module under pqproxy/tls/"
    # The ClientHello checks are their own module, under the engine's rules.
    assert ("tls-is-sans-io", "pqproxy/tls/hello_checks.py") in {(r.id, p) for r, p in _cases()}
    assert _cases(), "no (rule, file) pair to check"


# --- the checker can fail -------------------------------------------------------------------

KNOWN = frozenset(
    {
        "pqproxy",
        "pqproxy.tls",
        "pqproxy.tls.enums",
        "pqproxy.tls.server",
        "pqproxy.tls.hello_checks",
        "pqproxy.tls.messages",
        "pqproxy.crypto",
        "pqproxy.crypto.provider",
        "pqproxy.crypto.hybrid",
        "pqproxy.crypto.backends",
        "pqproxy.crypto.backends.openssl",
        "pqproxy.io",
        "pqproxy.io.listener",
        "pqproxy.metrics",
    }
)

FLAGGED = [
    ("tls-is-sans-io", "pqproxy.tls.server", "import asyncio", "asyncio"),
    ("tls-is-sans-io", "pqproxy.tls.server", "import socket as s", "socket"),
    ("tls-is-sans-io", "pqproxy.tls.server", "from ssl import SSLContext", "ssl"),
    ("tls-is-sans-io", "pqproxy.tls.server", "from ..io import listener", "pqproxy.io.listener"),
    ("tls-is-sans-io", "pqproxy.tls.server", "from .. import io", "pqproxy.io"),
    (
        "tls-is-sans-io",
        "pqproxy.tls.server",
        "import prometheus_client.core",
        "prometheus_client.core",
    ),
    (
        "tls-is-sans-io",
        "pqproxy.tls.server",
        "def f():\n    from pqproxy.crypto.backends import openssl",
        "pqproxy.crypto.backends.openssl",
    ),
    (
        "tls-is-sans-io",
        "pqproxy.tls.server",
        "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    from pqproxy.metrics import M",
        "pqproxy.metrics",
    ),
    ("tls-is-sans-io", "pqproxy.tls.hello_checks", "import asyncio", "asyncio"),
    (
        "tls-is-sans-io",
        "pqproxy.tls.hello_checks",
        "from ..metrics import M",
        "pqproxy.metrics",
    ),
    (
        "hello-checks-are-pure",
        "pqproxy.tls.hello_checks",
        "from .server import ServerConnection",
        "pqproxy.tls.server",
    ),
    (
        "tls-sees-only-crypto-provider",
        "pqproxy.tls.server",
        "from ..crypto import hybrid",
        "pqproxy.crypto.hybrid",
    ),
    (
        "tls-sees-only-crypto-provider",
        "pqproxy.tls.server",
        "import pqproxy.crypto",
        "pqproxy.crypto",
    ),
    (
        "tls-sees-only-crypto-provider",
        "pqproxy.tls",
        "from ..crypto.hybrid import Hybrid",
        "pqproxy.crypto.hybrid",
    ),
    (
        "backend-below-engine",
        "pqproxy.crypto.backends.openssl",
        "from ...tls.server import ServerConnection",
        "pqproxy.tls.server",
    ),
    (
        "backend-below-engine",
        "pqproxy.crypto.backends.openssl",
        "from pqproxy.tls import server",
        "pqproxy.tls.server",
    ),
    (
        "backend-below-engine",
        "pqproxy.crypto.backends.openssl",
        "import pqproxy.io.listener",
        "pqproxy.io.listener",
    ),
    ("crypto-asyncio-only-in-offload", "pqproxy.crypto.hybrid", "import asyncio", "asyncio"),
    (
        "crypto-asyncio-only-in-offload",
        "pqproxy.crypto.backends.openssl",
        "from asyncio import Queue",
        "asyncio",
    ),
    ("metrics-defines-only", "pqproxy.metrics", "from .io import listener", "pqproxy.io.listener"),
    ("metrics-defines-only", "pqproxy.metrics", "from .tls.enums import X", "pqproxy.tls.enums"),
    ("metrics-defines-only", "pqproxy.metrics", "import asyncio", "asyncio"),
    (
        "prometheus-only-in-metrics",
        "pqproxy.io.listener",
        "from prometheus_client import Counter",
        "prometheus_client",
    ),
    (
        "prometheus-only-in-metrics",
        "pqproxy.io.listener",
        "import prometheus_client.multiprocess",
        "prometheus_client.multiprocess",
    ),
    ("relay-is-sans-io", "pqproxy.relay.request", "import asyncio", "asyncio"),
    ("relay-is-sans-io", "pqproxy.relay.response", "from ..io import upstream", "pqproxy.io"),
    ("relay-is-sans-io", "pqproxy.relay.forwarding", "from ..metrics import M", "pqproxy.metrics"),
    (
        "relay-fields-is-the-base",
        "pqproxy.relay.fields",
        "from .errors import E",
        "pqproxy.relay.errors",
    ),
    (
        "relay-request-side-below-forwarding",
        "pqproxy.relay.request",
        "from .response import UpstreamResponseParser",
        "pqproxy.relay.response",
    ),
    ("no-pyopenssl", "pqproxy.io.listener", "from OpenSSL import SSL", "OpenSSL"),
    ("no-pyopenssl", "pqproxy.crypto.backends.openssl", "import OpenSSL.crypto", "OpenSSL.crypto"),
    ("no-pyopenssl", "pqproxy", "import importlib\nimportlib.import_module('OpenSSL')", "OpenSSL"),
    ("no-pyopenssl", "pqproxy", "__import__('OpenSSL.SSL')", "OpenSSL.SSL"),
    # The bench exemption is the package pqproxy.bench, not every name that starts alike.
    ("no-pyopenssl", "pqproxy.benchmarks", "from OpenSSL import SSL", "OpenSSL"),
    ("no-pyopenssl", "pqproxy.io.bench", "from OpenSSL import SSL", "OpenSSL"),
]

ALLOWED = [
    (
        "tls-is-sans-io",
        "pqproxy.tls.server",
        "import struct\nfrom cryptography.hazmat.primitives import hashes",
    ),
    ("tls-is-sans-io", "pqproxy.tls.server", "from . import enums\nfrom .enums import NamedGroup"),
    ("tls-is-sans-io", "pqproxy.tls.server", "import asyncio_helpers_not_asyncio"),
    ("hello-checks-are-pure", "pqproxy.tls.hello_checks", "from .messages import ClientHello"),
    ("tls-sees-only-crypto-provider", "pqproxy.tls.server", "from ..crypto import provider"),
    (
        "tls-sees-only-crypto-provider",
        "pqproxy.tls.server",
        "from ..crypto.provider import KxGroup",
    ),
    ("tls-sees-only-crypto-provider", "pqproxy.tls.server", "import pqproxy.crypto.provider as p"),
    (
        "backend-below-engine",
        "pqproxy.crypto.backends.openssl",
        "from ...tls.enums import NamedGroup",
    ),
    ("backend-below-engine", "pqproxy.crypto.backends.openssl", "from ..provider import Kem"),
    ("crypto-asyncio-only-in-offload", "pqproxy.crypto.offload", "import asyncio"),
    ("crypto-asyncio-only-in-offload", "pqproxy.io.listener", "import asyncio"),
    (
        "no-pyopenssl",
        "pqproxy.crypto.backends.openssl",
        "from cryptography.hazmat.bindings.openssl import binding",
    ),
    ("metrics-defines-only", "pqproxy.metrics", "import os\nfrom prometheus_client import Gauge"),
    ("prometheus-only-in-metrics", "pqproxy.metrics", "from prometheus_client import Counter"),
    ("prometheus-only-in-metrics", "pqproxy.io.listener", "from ..metrics import ProxyMetrics"),
    ("relay-is-sans-io", "pqproxy.relay.request", "import h11\nfrom ..logtext import printable"),
    ("relay-fields-is-the-base", "pqproxy.relay.fields", "import re\nimport h11"),
    ("relay-request-side-below-forwarding", "pqproxy.relay.body", "from .errors import HttpError"),
    (
        "relay-request-side-below-forwarding",
        "pqproxy.relay.identity",
        "from .fields import HeaderList",
    ),
    ("no-pyopenssl", "pqproxy.bench", "from OpenSSL import SSL"),
    ("no-pyopenssl", "pqproxy.bench.handshake", "from OpenSSL._util import lib"),
]


@pytest.mark.parametrize(("rule_id", "module", "source", "target"), FLAGGED)
def test_checker_flags_a_violation(rule_id: str, module: str, source: str, target: str) -> None:
    is_package = module in ("pqproxy", "pqproxy.tls")
    found = violations(RULES_BY_ID[rule_id], source, module, is_package, KNOWN)
    assert [imp.target for imp in found] == [target]


@pytest.mark.parametrize(("rule_id", "module", "source"), ALLOWED)
def test_checker_allows(rule_id: str, module: str, source: str) -> None:
    assert violations(RULES_BY_ID[rule_id], source, module, False, KNOWN) == []


def test_checker_reports_file_and_line() -> None:
    source = '"""doc"""\n\nimport struct\nimport socket\n'
    found = violations(RULES_BY_ID["tls-is-sans-io"], source, "pqproxy.tls.record", False, KNOWN)
    assert found == [Import(lineno=4, target="socket")]


@pytest.mark.parametrize(
    ("module", "is_package", "level", "name", "expected"),
    [
        ("pqproxy.tls.server", False, 1, "enums", "pqproxy.tls.enums"),
        ("pqproxy.tls.server", False, 1, None, "pqproxy.tls"),
        ("pqproxy.tls.server", False, 2, "crypto.provider", "pqproxy.crypto.provider"),
        ("pqproxy.tls", True, 1, "enums", "pqproxy.tls.enums"),
        ("pqproxy.tls", True, 2, None, "pqproxy"),
        ("pqproxy.crypto.backends.openssl", False, 3, "tls.server", "pqproxy.tls.server"),
        ("pqproxy.tls.server", False, 0, "asyncio", "asyncio"),
    ],
)
def test_resolve_relative_imports(
    module: str, is_package: bool, level: int, name: str | None, expected: str
) -> None:
    assert resolve_from(module, is_package, level, name) == expected


def test_relative_import_beyond_the_package_is_an_error() -> None:
    with pytest.raises(ValueError):
        resolve_from("pqproxy.tls.server", False, 3, "x")


def test_module_name(tmp_path: Path) -> None:
    assert module_name(tmp_path / "pqproxy/tls/server.py", tmp_path) == (
        "pqproxy.tls.server",
        False,
    )
    assert module_name(tmp_path / "pqproxy/tls/__init__.py", tmp_path) == ("pqproxy.tls", True)
