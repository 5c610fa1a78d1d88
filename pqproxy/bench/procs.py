"""Servers under test as subprocesses, and what they cost, read from ``/proc``.

The server's CPU is read from ``/proc/<pid>/stat`` (utime + stime) of the server process and
every descendant (the workers of a supervisor, nginx's workers), never inferred from the
client's wall time: on a shared machine the client's clock also counts time the server spent
waiting for the client.
"""

from __future__ import annotations

import os
import re
import resource
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path

PROC = Path("/proc")
CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096
# A server start-up imports cryptography and loads a certificate: far below this when healthy.
STARTUP_TIMEOUT = 60.0
STOP_TIMEOUT = 15.0


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (which may hold spaces)."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    return text[text.rfind(")") + 2 :].split()


def descendants(pid: int) -> list[int]:
    """``pid`` and every live process below it (one scan of /proc: the kernel here has no
    /proc/<pid>/task/<tid>/children)."""
    children: dict[int, list[int]] = {}
    for entry in PROC.iterdir():
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is None:
            continue
        # Field 4 of stat is the ppid; after the command name it is index 1.
        children.setdefault(int(fields[1]), []).append(int(entry.name))
    found = [pid]
    index = 0
    while index < len(found):
        found.extend(children.get(found[index], ()))
        index += 1
    return found


def cpu_seconds(pids: Sequence[int]) -> float:
    """utime + stime of each process in ``pids`` (fields 14 and 15 of stat), in seconds."""
    ticks = 0
    for pid in pids:
        fields = _stat_fields(pid)
        if fields is not None:
            # stat field n is index n - 3 here (pid and comm removed).
            ticks += int(fields[11]) + int(fields[12])
    return ticks / CLOCK_TICKS


def tree_cpu_seconds(pid: int) -> float:
    return cpu_seconds(descendants(pid))


def rss_bytes(pids: Sequence[int]) -> int:
    """Resident set size of each process in ``pids``, summed (statm's second field)."""
    total = 0
    for pid in pids:
        try:
            resident = int((PROC / str(pid) / "statm").read_text().split()[1])
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
        total += resident * PAGE_SIZE
    return total


def machine_cpu_times() -> tuple[int, int] | None:
    """(busy, total) jiffies of the whole machine from /proc/stat, or None off Linux."""
    try:
        first = (PROC / "stat").read_text().splitlines()[0].split()
    except (FileNotFoundError, IndexError):
        return None
    values = [int(v) for v in first[1:]]
    # idle and iowait are the 4th and 5th values; guest time is already inside user.
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    total = sum(values[:8])
    return total - idle, total


def raise_nofile_limit() -> int:
    """Raise this process's open-file soft limit to its hard limit; returns the new limit.
    Thousands of sockets need it, and children started afterwards inherit it."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


class ServerProcess:
    """A server started as a subprocess, its stderr read on a thread (so the pipe never
    fills), waited for until it prints the line that says where it listens (``ready``)."""

    def __init__(
        self,
        argv: Sequence[str],
        *,
        ready: str | None,
        cwd: Path | None = None,
        env: dict[str, str] | None = None,
        timeout: float = STARTUP_TIMEOUT,
    ) -> None:
        self.argv = list(argv)
        self.popen = subprocess.Popen(
            self.argv,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
            # Its own process group: stop() signals the server and every worker it forked.
            start_new_session=True,
        )
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._eof = False
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()
        # None: the server prints nothing when ready; the caller checks readiness itself.
        self._match = self.wait_for(ready, timeout) if ready is not None else None

    @property
    def match(self) -> re.Match[str]:
        """The ready line's match (its groups say where the server listens)."""
        if self._match is None:
            raise RuntimeError(f"{self.argv[0]} was started without a ready line")
        return self._match

    @property
    def pid(self) -> int:
        return self.popen.pid

    def _read(self) -> None:
        assert self.popen.stderr is not None
        for line in self.popen.stderr:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def wait_for(self, pattern: str, timeout: float) -> re.Match[str]:
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            seen = 0
            while True:
                for line in self.lines[seen:]:
                    match = regex.search(line)
                    if match:
                        return match
                seen = len(self.lines)
                remaining = deadline - time.monotonic()
                if self._eof or remaining <= 0:
                    break
                self._cond.wait(remaining)
        self.stop()
        why = "exited" if self._eof else f"printed nothing matching it in {timeout:g}s"
        raise RuntimeError(
            f"{' '.join(self.argv)}: {why} (waiting for {pattern!r}); stderr:\n"
            + "\n".join(self.lines[-30:])
        )

    def tree(self) -> list[int]:
        return descendants(self.pid)

    def cpu_seconds(self) -> float:
        return tree_cpu_seconds(self.pid)

    def rss_bytes(self) -> int:
        return rss_bytes(self.tree())

    def stop(self) -> int:
        """SIGTERM to its process group, SIGKILL if it has not exited in time."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
                self.popen.wait(STOP_TIMEOUT)
        self._reader.join(STOP_TIMEOUT)
        if self.popen.stderr is not None:
            self.popen.stderr.close()
        return self.popen.returncode

    def __enter__(self) -> ServerProcess:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()


def python_env(repo_root: Path) -> dict[str, str]:
    """The environment for ``python -m pqproxy``: the repository on the path, unbuffered."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(repo_root), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


PQPROXY_LISTENING = r"pqproxy listening on https://[^ ]*:(\d+) "
DEMO_LISTENING = r"demo upstream listening on http://[^ ]*:(\d+)"


def pqproxy_argv(*args: str) -> list[str]:
    return [sys.executable, "-m", "pqproxy", *args]
