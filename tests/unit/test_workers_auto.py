"""Issue 19: ``workers: auto``, ``limits.backlog`` on every listening socket, the somaxconn
warning, and what the deployment files ship for them.

The cgroup trees are fake directories (``pqproxy.cpus`` takes its root and the process's
cgroup file as parameters); the sockets and listeners are real.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import socket
from pathlib import Path
from typing import Any

import pytest
import yaml

from pqproxy.argtypes import positive_int_or_auto
from pqproxy.config import (
    DEFAULT_BACKLOG,
    ConfigError,
    apply_overrides,
    config_from_flags,
    describe,
    parse_config,
)
from pqproxy.cpus import available_cpus, cgroup_cpu_limit, schedulable_cpus
from pqproxy.devcert import DevCertPaths
from pqproxy.io.listen_queue import (
    ListenQueueMonitor,
    read_kernel_counters,
    warn_backlog_capped,
)
from pqproxy.io.supervisor import ReloadRefused, _bind_reuseport, check_reloadable
from pqproxy.io.telemetry import Telemetry
from pqproxy.io.tls_server import ListenerSettings, TLSListener
from pqproxy.metrics import ProxyMetrics
from tests.inprocess import local_listener_settings

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"


def _cgroup(tmp_path: Path, proc: str, files: dict[str, str]) -> tuple[Path, Path]:
    root = tmp_path / "sys-fs-cgroup"
    root.mkdir()
    for relative, text in files.items():
        path = root / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text + "\n")
    proc_file = tmp_path / "proc-self-cgroup"
    proc_file.write_text(proc)
    return root, proc_file


# -- workers: auto -----------------------------------------------------------------------------


def test_issue19_workers_auto_without_a_quota_is_the_affinity_count(tmp_path: Path) -> None:
    root, proc = _cgroup(tmp_path, "0::/\n", {"cpu.max": "max 100000"})
    assert cgroup_cpu_limit(root, proc) is None
    assert available_cpus(root, proc) == len(os.sched_getaffinity(0)) == schedulable_cpus()
    # No cgroup file at all (not Linux, or hidden): the affinity count too.
    assert available_cpus(tmp_path / "none", tmp_path / "none") == schedulable_cpus()


@pytest.mark.parametrize(
    ("files", "expected"),
    [
        # A pod limit of 3 CPUs on the container's own cgroup.
        ({"kubepods/pod1/ctr/cpu.max": "300000 100000"}, 3),
        # 1.5 CPUs: one worker (two would be throttled in turn), never zero.
        ({"kubepods/pod1/ctr/cpu.max": "150000 100000"}, 1),
        ({"kubepods/pod1/ctr/cpu.max": "10000 100000"}, 1),
        # The tightest along the path wins: the pod's 2 over the container's "max".
        (
            {"kubepods/pod1/ctr/cpu.max": "max 100000", "kubepods/pod1/cpu.max": "200000 100000"},
            2,
        ),
        # More quota than CPUs to run on: the affinity count.
        ({"kubepods/pod1/ctr/cpu.max": "6400000 100000"}, 8),
    ],
)
def test_issue19_workers_auto_follows_the_cgroup_v2_quota(
    tmp_path: Path, files: dict[str, str], expected: int
) -> None:
    root, proc = _cgroup(tmp_path, "0::/kubepods/pod1/ctr\n", files)
    assert available_cpus(root, proc, affinity=8) == expected


def test_issue19_workers_auto_inside_a_cgroup_namespace(tmp_path: Path) -> None:
    # A container with its own cgroup namespace sees itself at "/" and its limit at the root.
    root, proc = _cgroup(tmp_path, "0::/\n", {"cpu.max": "400000 100000"})
    assert cgroup_cpu_limit(root, proc) == 4.0
    assert available_cpus(root, proc, affinity=16) == 4


def test_issue19_workers_auto_follows_the_cgroup_v1_quota(tmp_path: Path) -> None:
    proc = "12:memory:/docker/abc\n4:cpu,cpuacct:/docker/abc\n1:name=systemd:/docker/abc\n"
    root, proc_file = _cgroup(
        tmp_path,
        proc,
        {
            "cpu,cpuacct/docker/abc/cpu.cfs_quota_us": "250000",
            "cpu,cpuacct/docker/abc/cpu.cfs_period_us": "100000",
        },
    )
    assert available_cpus(root, proc_file, affinity=8) == 2
    # -1: no quota.
    (root / "cpu,cpuacct/docker/abc/cpu.cfs_quota_us").write_text("-1\n")
    assert available_cpus(root, proc_file, affinity=8) == 8


def test_issue19_workers_auto_v1_mount_root_is_the_containers_cgroup(tmp_path: Path) -> None:
    # Inside the container the host path does not exist under the mount: its root is it.
    root, proc_file = _cgroup(
        tmp_path,
        "3:cpu:/kubepods/burstable/pod9/ctr\n",
        {"cpu/cpu.cfs_quota_us": "200000", "cpu/cpu.cfs_period_us": "100000"},
    )
    assert available_cpus(root, proc_file, affinity=8) == 2


def _minimal(**top: Any) -> dict[str, Any]:
    return {
        "listeners": [
            {
                "name": "main",
                "listen": "127.0.0.1:8443",
                "upstream": "demo",
                "tls": {"certificates": [{"cert": "server.pem", "key": "server.key"}]},
            }
        ],
        "upstreams": {"demo": {"servers": ["http://127.0.0.1:8000"]}},
        **top,
    }


@pytest.fixture
def base(tmp_path: Path) -> Path:
    (tmp_path / "server.pem").write_text("")
    (tmp_path / "server.key").write_text("")
    return tmp_path


def test_issue19_workers_auto_is_the_default_of_a_config_file(base: Path) -> None:
    config = parse_config(_minimal(), base, available_cpus=lambda: 6)
    assert (config.workers, config.workers_auto) == (6, True)
    assert "6 workers (auto)" in describe(config)
    config = parse_config(_minimal(workers="auto"), base, available_cpus=lambda: 3)
    assert (config.workers, config.workers_auto) == (3, True)
    config = parse_config(_minimal(workers=2), base, available_cpus=lambda: 6)
    assert (config.workers, config.workers_auto) == (2, False)
    # The real resolver, with this process's CPUs.
    assert parse_config(_minimal(), base).workers == available_cpus()
    with pytest.raises(ConfigError) as caught:
        parse_config(_minimal(workers="many"), base)
    assert caught.value.problems == ["workers: expected a whole number, got the string 'many'"]


def test_issue19_workers_flag_takes_auto(base: Path) -> None:
    flags = config_from_flags(
        "127.0.0.1:8443", base / "server.pem", base / "server.key", ["http://127.0.0.1:8000"]
    )
    assert (flags.workers, flags.workers_auto) == (1, False)  # without --config: one process
    auto = config_from_flags(
        "127.0.0.1:8443",
        base / "server.pem",
        base / "server.key",
        ["http://127.0.0.1:8000"],
        workers="auto",
    )
    assert (auto.workers, auto.workers_auto) == (available_cpus(), True)
    file_config = parse_config(_minimal(workers=5), base)
    overridden = apply_overrides(file_config, workers="auto")
    assert (overridden.workers, overridden.workers_auto) == (available_cpus(), True)
    assert apply_overrides(overridden, workers=3).workers_auto is False
    assert positive_int_or_auto("auto") == "auto"
    assert positive_int_or_auto("4") == 4


def test_issue19_reload_with_auto_keeps_the_running_workers(base: Path) -> None:
    old = parse_config(_minimal(), base, available_cpus=lambda: 4)
    new = parse_config(_minimal(), base, available_cpus=lambda: 2)  # the quota changed
    check_reloadable(old, new)
    with pytest.raises(ReloadRefused, match="workers changed from 4 to 2"):
        check_reloadable(old, parse_config(_minimal(workers=2), base))


# -- limits.backlog -----------------------------------------------------------------------------


def _with_limits(**limits: Any) -> dict[str, Any]:
    data = _minimal()
    data["listeners"][0]["limits"] = limits
    return data


def test_issue19_backlog_config(base: Path) -> None:
    assert parse_config(_minimal(), base).listeners[0].limits.backlog == DEFAULT_BACKLOG == 4096
    assert parse_config(_with_limits(backlog=16), base).listeners[0].limits.backlog == 16
    for bad, message in (
        (0, "0 is too small (minimum 1)"),
        (1 << 21, "2097152 is too large (maximum 1048576)"),
        ("big", "expected a whole number, got the string 'big'"),
    ):
        with pytest.raises(ConfigError) as caught:
            parse_config(_with_limits(backlog=bad), base)
        assert caught.value.problems == [f"listeners[0].limits.backlog: {message}"]
    with pytest.raises(ReloadRefused, match="limits.backlog changed from 4096 to 16"):
        check_reloadable(
            parse_config(_minimal(), base), parse_config(_with_limits(backlog=16), base)
        )


def test_issue19_somaxconn_below_the_backlog_is_said_once(
    base: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    somaxconn = tmp_path / "somaxconn"
    somaxconn.write_text("128\n")
    config = parse_config(_minimal(), base)
    with caplog.at_level(logging.WARNING, logger="pqproxy.io.listen_queue"):
        lines = warn_backlog_capped(config, somaxconn)
    assert lines == [
        "listener main: limits.backlog 4096 is above the kernel's net.core.somaxconn 128: the "
        "accept queue holds 128 connections (raise it with sysctl net.core.somaxconn=4096)"
    ]
    assert [r.getMessage() for r in caplog.records] == lines
    somaxconn.write_text("65535\n")
    assert warn_backlog_capped(config, somaxconn) == []


def _settings(dev_certs: DevCertPaths, backlog: int) -> ListenerSettings:
    return local_listener_settings(dev_certs, 9, backlog=backlog)


def test_issue19_backlog_reaches_every_listening_socket(dev_certs: DevCertPaths) -> None:
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())

    async def main() -> list[int]:
        limits = []
        # One process: the listener binds its address itself.
        single = TLSListener(_settings(dev_certs, 777))
        await single.start()
        limits += [q.limit for q in single.listen_queues()]
        # A worker: the supervisor's SO_REUSEPORT socket, bound but not listening.
        sock = _bind_reuseport(socket.AF_INET, ("127.0.0.1", 0))
        worker = TLSListener(_settings(dev_certs, 555))
        await worker.start(sock)
        limits += [q.limit for q in worker.listen_queues()]
        await single.close(grace=1.0)
        await worker.close(grace=1.0)
        return limits

    assert asyncio.run(main()) == [min(777, somaxconn), min(555, somaxconn)]


def test_issue19_listen_queue_monitor_counts_namespace_growth(
    dev_certs: DevCertPaths, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    netstat = tmp_path / "netstat"

    def write(overflows: int, drops: int) -> None:
        netstat.write_text(
            "TcpExt: SyncookiesSent ListenOverflows ListenDrops TCPFastOpenListenOverflow\n"
            f"TcpExt: 0 {overflows} {drops} 0\n"
            "IpExt: InNoRoutes\nIpExt: 0\n"
        )

    write(10, 12)
    assert read_kernel_counters(netstat) is not None
    telemetry = Telemetry(ProxyMetrics())

    async def main() -> None:
        listener = TLSListener(_settings(dev_certs, 64))
        await listener.start()
        monitor = ListenQueueMonitor(
            lambda: [("main", listener)], telemetry, kernel_counters=True, netstat=netstat
        )
        quiet = monitor.sample()
        assert (quiet.overflows, quiet.drops) == (0, 0)
        assert quiet.queues["main"].limit == min(
            64, int(Path("/proc/sys/net/core/somaxconn").read_text())
        )
        write(13, 16)
        grown = monitor.sample()
        assert (grown.overflows, grown.drops) == (3, 4)
        await listener.close(grace=1.0)

    with caplog.at_level(logging.WARNING, logger="pqproxy.io.listen_queue"):
        asyncio.run(main())
    registry = telemetry.metrics.registry
    assert registry.get_sample_value("pqproxy_listen_overflows_total") == 3
    assert registry.get_sample_value("pqproxy_listen_drops_total") == 4
    assert registry.get_sample_value("pqproxy_listen_backlog", {"listener": "main"}) == 64
    warnings = [r.getMessage() for r in caplog.records]
    assert len(warnings) == 1
    assert "ListenOverflows +3, ListenDrops +4" in warnings[0]
    assert "whole network namespace" in warnings[0]


# -- what the deployment ships -----------------------------------------------------------------


def _pqproxy_configs() -> dict[str, dict[str, Any]]:
    found = {}
    for path in [
        DEPLOY / "base" / "configmap.yaml",
        *DEPLOY.glob("overlays/*/pqproxy-config.yaml"),
    ]:
        doc = yaml.safe_load(path.read_text())
        found[path.parent.name] = yaml.safe_load(doc["data"]["pqproxy.yaml"])
    return found


def test_issue19_the_deployment_sets_workers_from_the_cpu_limit() -> None:
    configs = _pqproxy_configs()
    assert set(configs) == {"base", "vllm", "ollama", "triton"}
    assert {name: c["workers"] for name, c in configs.items()} == dict.fromkeys(configs, "auto")
    deployment = yaml.safe_load((DEPLOY / "base" / "deployment.yaml").read_text())
    (sidecar,) = [
        c
        for c in deployment["spec"]["template"]["spec"]["initContainers"]
        if c["name"] == "pqproxy"
    ]
    assert sidecar["resources"]["limits"]["cpu"] == "2"


def test_issue19_the_shipped_rules_alert_on_listen_overflows() -> None:
    rule_file = DEPLOY / "base" / "prometheusrule.yaml"
    doc = yaml.safe_load(rule_file.read_text())
    assert doc["kind"] == "PrometheusRule"
    kustomization = yaml.safe_load((DEPLOY / "base" / "kustomization.yaml").read_text())
    assert "prometheusrule.yaml" in kustomization["resources"]
    rules = {r["alert"]: r for g in doc["spec"]["groups"] for r in g["rules"]}
    assert "pqproxy_listen_overflows_total" in rules["PqproxyListenQueueOverflow"]["expr"]
    known = ProxyMetrics().sample_names()
    used = {n for r in rules.values() for n in re.findall(r"\bpqproxy_\w+", r["expr"])}
    assert used and used <= known, sorted(used - known)
