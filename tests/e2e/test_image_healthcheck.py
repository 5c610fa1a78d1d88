"""The Dockerfile's HEALTHCHECK command, run as it is against a real ``pqproxy serve``: no
Docker engine here, but the command is plain Python and can be run without one."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from pqproxy.config import DEFAULT_ADMIN_PORT
from tests.e2e.processes import REPO_ROOT, gen_cert, start_demo_upstream, start_serve

pytestmark = pytest.mark.e2e

ADMIN_RE = r"pqproxy admin on http://127\.0\.0\.1:(\d+) "


def healthcheck_argv() -> list[str]:
    """The exec-form CMD of the Dockerfile's HEALTHCHECK (continuation lines joined)."""
    text = (REPO_ROOT / "Dockerfile").read_text(encoding="utf-8").replace("\\\n", " ")
    (line,) = [line for line in text.splitlines() if line.startswith("HEALTHCHECK ")]
    argv: list[str] = json.loads(line.partition(" CMD ")[2])
    return argv


def run_check(port: int) -> int:
    argv = healthcheck_argv()
    assert argv[0] == "python"
    # The image's port, moved to the one this test's pqproxy got.
    code = argv[2].replace(f"127.0.0.1:{DEFAULT_ADMIN_PORT}/", f"127.0.0.1:{port}/")
    assert code != argv[2]
    return subprocess.run([sys.executable, *argv[1:2], code], timeout=30, check=False).returncode


def test_the_healthcheck_passes_while_pqproxy_serves_and_fails_after(tmp_path: Path) -> None:
    certs = gen_cert(tmp_path / "certs")
    upstream, upstream_port = start_demo_upstream()
    try:
        serve = start_serve(
            "--listen",
            "127.0.0.1:0",
            "--cert",
            str(certs.cert),
            "--key",
            str(certs.key),
            "--upstream",
            f"http://127.0.0.1:{upstream_port}",
            "--admin",
            "127.0.0.1:0",
        )
        try:
            port = int(serve.proc.wait_for_line(ADMIN_RE).group(1))
            assert run_check(port) == 0
        finally:
            assert serve.proc.stop() == 0, serve.proc.output()
        # Nothing listens there any more: the check fails, as Docker must see it.
        assert run_check(port) != 0
        assert not re.search(r"Traceback", serve.proc.output())
    finally:
        upstream.stop()
