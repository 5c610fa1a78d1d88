"""Helpers for the e2e tests of ``pqproxy serve`` from a config file, workers and signals:
real ``python -m pqproxy`` subprocesses, their stderr read line by line on a thread, config
files written to a temporary directory, and a blocking SSE reader over stdlib ``ssl``."""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import signal
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]
# Start-up imports cryptography and loads a certificate; far beyond a healthy start.
STARTUP_TIMEOUT = 30.0
WAIT = 10.0
LISTENING_RE = r"pqproxy listening on https://127\.0\.0\.1:(\d+) \(groups: "


@dataclass(frozen=True)
class Certs:
    ca: Path
    cert: Path
    key: Path


def env() -> dict[str, str]:
    values = dict(os.environ)
    values["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), values.get("PYTHONPATH")]))
    values["PYTHONUNBUFFERED"] = "1"
    return values


def pqproxy_run(*args: str, timeout: float = STARTUP_TIMEOUT) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "pqproxy", *args],
        cwd=REPO_ROOT,
        env=env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def gen_cert(out: Path) -> Certs:
    result = pqproxy_run("gen-cert", "--out", str(out))
    assert result.returncode == 0, result.stderr
    return Certs(ca=out / "ca.pem", cert=out / "server.pem", key=out / "server.key")


def install_certs(source: Certs, target: Certs) -> None:
    """Replace the served files as a deployment would: each file swapped in atomically."""
    for src, dst in ((source.cert, target.cert), (source.key, target.key)):
        tmp = dst.with_name(dst.name + ".new")
        shutil.copyfile(src, tmp)
        os.replace(tmp, dst)


class Process:
    """A pqproxy subprocess whose stderr is read on a thread, so the pipe never fills and a
    test can wait for a line with a deadline."""

    def __init__(self, *args: str, extra_env: Mapping[str, str] | None = None) -> None:
        self.args = args
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "pqproxy", *args],
            cwd=REPO_ROOT,
            env={**env(), **(extra_env or {})},
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: list[str] = []
        self._lock = threading.Lock()
        self._changed = threading.Condition(self._lock)
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()
        with self._changed:
            self._eof = True
            self._changed.notify_all()

    def mark(self) -> int:
        """A position in the output: ``wait_for_line(after=...)`` looks only past it."""
        with self._lock:
            return len(self.lines)

    def wait_for_line(
        self, pattern: str, timeout: float = STARTUP_TIMEOUT, *, after: int = 0
    ) -> re.Match[str]:
        """The first line from index ``after`` on that matches ``pattern``."""
        return self.wait_for_lines(pattern, 1, timeout, after=after)[0]

    def wait_for_lines(
        self, pattern: str, count: int, timeout: float = STARTUP_TIMEOUT, *, after: int = 0
    ) -> list[re.Match[str]]:
        """The first ``count`` lines from index ``after`` on that match ``pattern``."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                found = [m for line in self.lines[after:] if (m := regex.search(line))]
                if len(found) >= count:
                    return found[:count]
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    state = f"exited ({self.popen.poll()})" if self._eof else "timed out"
                    raise AssertionError(
                        f"{state}: {len(found)}/{count} lines matching {pattern!r}; "
                        f"stderr:\n{self.output()}"
                    )
                self._changed.wait(remaining)

    def output(self) -> str:
        return "\n".join(self.lines)

    def signal(self, sig: signal.Signals) -> None:
        self.popen.send_signal(sig)

    def wait(self, timeout: float) -> int:
        """The exit status, once the process exited and its stderr is read to the end."""
        try:
            return self.popen.wait(timeout)
        finally:
            self._close_pipe(timeout)

    def _close_pipe(self, timeout: float) -> None:
        if self.popen.poll() is None:
            return  # still running: the reader thread owns the pipe
        self._reader.join(timeout)
        if self.popen.stderr is not None and not self._reader.is_alive():
            self.popen.stderr.close()

    def stop(self, timeout: float = WAIT) -> int:
        """SIGTERM, then SIGKILL if it does not exit in time; the exit status."""
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout)
        self._close_pipe(timeout)
        return self.popen.returncode


def start_demo_upstream(*args: str) -> tuple[Process, int]:
    proc = Process("demo-upstream", "--listen", "127.0.0.1:0", *args)
    try:
        match = proc.wait_for_line(r"demo upstream listening on http://127\.0\.0\.1:(\d+)")
    except BaseException:
        proc.stop()
        raise
    return proc, int(match.group(1))


def write_config(
    path: Path,
    *,
    certs: Certs,
    upstream_port: int,
    listen: str = "127.0.0.1:0",
    workers: int = 1,
    drain_timeout: str = "20s",
    log_format: str = "text",
    groups: str = "[X25519MLKEM768, x25519, secp256r1]",
) -> Path:
    path.write_text(
        f"""\
workers: {workers}
admin: null
logging: {{level: info, access_log: true, format: {log_format}}}
drain_timeout: {drain_timeout}
listeners:
  - name: main
    listen: "{listen}"
    upstream: model
    tls:
      certificates:
        - cert: {certs.cert}
          key: {certs.key}
      groups: {groups}
upstreams:
  model:
    servers: [http://127.0.0.1:{upstream_port}]
    health_check: null
""",
        encoding="utf-8",
    )
    return path


@dataclass
class Serve:
    proc: Process
    port: int


def start_serve(*args: str, extra_env: Mapping[str, str] | None = None) -> Serve:
    proc = Process("serve", *args, extra_env=extra_env)
    try:
        match = proc.wait_for_line(LISTENING_RE)
    except BaseException:
        proc.stop()
        raise
    return Serve(proc, int(match.group(1)))


def tls_context(ca: Path) -> ssl.SSLContext:
    """Trusts ``ca`` only (and checks the name 127.0.0.1, which gen-cert certifies)."""
    ctx = ssl.create_default_context(cafile=str(ca))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    return ctx


def get_json(port: int, ca: Path, path: str) -> tuple[int, object]:
    conn = http.client.HTTPSConnection("127.0.0.1", port, context=tls_context(ca), timeout=WAIT)
    try:
        conn.request("GET", path, headers={"Connection": "close"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


class SseStream:
    """One streamed chat completion over stdlib ``ssl``, read an event at a time."""

    def __init__(self, port: int, ca: Path, max_tokens: int) -> None:
        self.conn = http.client.HTTPSConnection(
            "127.0.0.1", port, context=tls_context(ca), timeout=WAIT
        )
        body = json.dumps(
            {"model": "pqproxy-demo", "stream": True, "max_tokens": max_tokens, "messages": []}
        )
        self.conn.request(
            "POST", "/v1/chat/completions", body, {"Content-Type": "application/json"}
        )
        self.response = self.conn.getresponse()
        assert self.response.status == 200
        assert self.response.getheader("content-type") == "text/event-stream"

    def events(self) -> Iterator[bytes]:
        """The data of each event, up to and including ``[DONE]``."""
        while True:
            line = self.response.readline()
            assert line, "stream ended before [DONE]"
            if not line.strip():
                continue
            assert line.startswith(b"data: "), line
            data = line[len(b"data: ") :].rstrip(b"\n")
            yield data
            if data == b"[DONE]":
                return

    def close(self) -> None:
        self.conn.close()


def chunk_text(events: list[bytes]) -> list[str]:
    """The content of each chat.completion.chunk event (``[DONE]`` excluded)."""
    return [json.loads(e)["choices"][0]["delta"]["content"] for e in events if e != b"[DONE]"]
