"""The deployment files: the Dockerfile, .dockerignore and the kustomize tree under deploy/.

No Docker engine and no cluster here, so what they promise is checked by reading them:

- Every full manifest, and the output of the base and of each overlay, validates against
  the Kubernetes OpenAPI schemas bundled in ``kubernetes-validate`` (strict: an unknown or
  misspelt field is an error), for the oldest Kubernetes the manifests claim (1.29: native
  sidecars) and the newest the package knows. The output is rendered by ``render`` below, a
  small kustomize (resources, patches by strategic merge); where ``kubectl kustomize`` is
  installed, its output must be the same.
- The pod security invariants, the sidecar shape, the ports, the probes and the shutdown
  timing are asserted on the rendered Deployment, and cross-checked against the pqproxy
  configuration in the ConfigMap, parsed by pqproxy's own config loader.
- The Dockerfile is parsed into stages and instructions, and its invariants asserted.
"""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

# kubernetes-validate (untyped) bundles the schemas of every Kubernetes release it knows, so
# validation needs no network.
from kubernetes_validate.utils import (  # type: ignore[import-untyped]
    SchemaNotFoundError,
    ValidationError,
    latest_version,
    validate,
)

from pqproxy import __version__
from pqproxy.config import DEFAULT_ADMIN_PORT, Config, Mode, load_yaml, parse_config
from pqproxy.io.supervisor import EXIT_GRACE

REPO_ROOT = Path(__file__).resolve().parents[2]
DEPLOY = REPO_ROOT / "deploy"
BASE = DEPLOY / "base"
OVERLAYS = {name: DEPLOY / "overlays" / name for name in ("vllm", "ollama", "triton")}
KUSTOMIZATIONS = {"base": BASE, **OVERLAYS}
# Native sidecars (initContainers with restartPolicy: Always) are on by default from 1.29.
K8S_VERSIONS = ("1.29.0", latest_version())
# Resources whose schemas are not Kubernetes' own: checked by hand below.
CUSTOM_KINDS = {
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
    ("monitoring.coreos.com/v1", "PrometheusRule"),
}

SIDECAR = "pqproxy"
MODEL_SERVER = "model-server"
CONFIG_KEY = "pqproxy.yaml"
ENTRYPOINT = ["pqproxy", "serve", "--config", "/etc/pqproxy/pqproxy.yaml"]
TLS_PORT_NAME = "tls"
ADMIN_PORT_NAME = "admin"

Doc = dict[str, Any]


# -- a small kustomize -----------------------------------------------------------------------------

# The fields a kustomization here may use; anything else would be silently ignored by
# ``render`` while kustomize applies it, so it is an error.
KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "patches", "images"}
# Strategic merge: lists of objects under these fields are merged item by item on this key
# (as the Kubernetes types declare with patchMergeKey); other lists are replaced.
MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "volumes": "name",
    "env": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
}


def load_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc]


def strategic_merge(base: Any, patch: Any, field_name: str = "") -> Any:
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for key, value in patch.items():
            if isinstance(key, str) and key.startswith("$"):
                raise AssertionError(f"patch directive {key} is not supported by render()")
            if value is None:
                merged.pop(key, None)  # null deletes, as in a strategic merge patch
            elif key in merged:
                merged[key] = strategic_merge(merged[key], value, key)
            else:
                merged[key] = value
        return merged
    if isinstance(base, list) and isinstance(patch, list) and field_name in MERGE_KEYS:
        key = MERGE_KEYS[field_name]
        if field_name == "ports" and any("containerPort" not in item for item in base + patch):
            key = "port"  # a Service's ports
        merged_list = list(base)
        for item in patch:
            index = next((i for i, old in enumerate(merged_list) if old[key] == item[key]), None)
            if index is None:
                merged_list.append(item)
            else:
                merged_list[index] = strategic_merge(merged_list[index], item)
        return merged_list
    return patch


def split_image(image: str) -> tuple[str, str]:
    """("registry:5000/name", ":tag" or "@sha256:..." or "")."""
    if "@" in image:
        name, _, digest = image.partition("@")
        return name, "@" + digest
    name, sep, tag = image.rpartition(":")
    if sep and "/" not in tag:
        return name, ":" + tag
    return image, ""


def set_images(docs: list[Doc], images: list[Doc]) -> None:
    """kustomize's images transformer, for the containers of Deployments."""
    for doc in docs:
        if doc["kind"] != "Deployment":
            continue
        pod = doc["spec"]["template"]["spec"]
        for container in pod.get("initContainers", []) + pod["containers"]:
            name, suffix = split_image(container["image"])
            for entry in images:
                if entry["name"] != name:
                    continue
                assert set(entry) <= {"name", "newName", "newTag", "digest"}, entry
                if "digest" in entry:
                    suffix = "@" + entry["digest"]
                elif "newTag" in entry:
                    suffix = ":" + str(entry["newTag"])
                container["image"] = entry.get("newName", name) + suffix


def render(directory: Path) -> list[Doc]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text("utf-8"))
    unknown = set(kustomization) - KUSTOMIZATION_FIELDS
    assert not unknown, f"{directory}: kustomization fields render() does not know: {unknown}"
    docs: list[Doc] = []
    for entry in kustomization.get("resources", []):
        target = (directory / entry).resolve()
        docs.extend(render(target) if target.is_dir() else load_docs(target))
    for patch_entry in kustomization.get("patches", []):
        assert set(patch_entry) == {"path"}, f"{directory}: only file patches: {patch_entry}"
        for patch in load_docs(directory / patch_entry["path"]):
            matches = [
                i
                for i, doc in enumerate(docs)
                if (doc["kind"], doc["metadata"]["name"])
                == (patch["kind"], patch["metadata"]["name"])
            ]
            assert len(matches) == 1, f"{patch_entry['path']}: {len(matches)} targets"
            docs[matches[0]] = strategic_merge(docs[matches[0]], patch)
    set_images(docs, kustomization.get("images", []))
    return docs


def patch_files(directory: Path) -> set[Path]:
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text("utf-8"))
    return {(directory / p["path"]).resolve() for p in kustomization.get("patches", [])}


@dataclass
class Rendered:
    docs: list[Doc]

    def one(self, kind: str, name: str | None = None) -> Doc:
        found = self.all(kind, name)
        assert len(found) == 1, f"{len(found)} {kind} {name or ''}"
        return found[0]

    def all(self, kind: str, name: str | None = None) -> list[Doc]:
        return [
            d
            for d in self.docs
            if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)
        ]

    @property
    def deployment(self) -> Doc:
        return self.one("Deployment")

    @property
    def pod(self) -> Doc:
        spec: Doc = self.deployment["spec"]["template"]["spec"]
        return spec

    def container(self, name: str) -> Doc:
        every: list[Doc] = self.pod.get("initContainers", []) + self.pod["containers"]
        (found,) = [c for c in every if c["name"] == name]
        return found

    @property
    def sidecar(self) -> Doc:
        return self.container(SIDECAR)

    @property
    def model_server(self) -> Doc:
        return self.container(MODEL_SERVER)

    def volume(self, name: str) -> Doc:
        volumes: list[Doc] = self.pod["volumes"]
        (found,) = [v for v in volumes if v["name"] == name]
        return found

    @property
    def config(self) -> Config:
        """The ConfigMap's pqproxy.yaml through pqproxy's own loader (files are in the
        cluster, not here: only their paths are checked)."""
        text = self.one("ConfigMap")["data"][CONFIG_KEY]
        return parse_config(load_yaml(text, CONFIG_KEY), Path("/etc/pqproxy"), check_files=False)


@pytest.fixture(scope="module", params=sorted(KUSTOMIZATIONS))
def rendered(request: pytest.FixtureRequest) -> Rendered:
    return Rendered(render(KUSTOMIZATIONS[request.param]))


def manifest_files() -> list[Path]:
    """Every complete manifest: all YAML under deploy/ except kustomizations and patches."""
    patches = set().union(*(patch_files(d) for d in KUSTOMIZATIONS.values()))
    files = sorted(DEPLOY.rglob("*.yaml"))
    return [f for f in files if f.name != "kustomization.yaml" and f.resolve() not in patches]


# -- schema validation -----------------------------------------------------------------------------


def assert_valid(doc: Doc, version: str, where: str) -> None:
    try:
        validate(doc, version, strict=True)
    except ValidationError as exc:
        path = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{where}: {doc['kind']} {doc['metadata']['name']}: {path}: {exc.message}")
    except SchemaNotFoundError:
        assert (doc["apiVersion"], doc["kind"]) in CUSTOM_KINDS, (
            f"{where}: no schema for {doc['apiVersion']} {doc['kind']}"
        )


def test_the_manifests_are_found() -> None:
    names = {f.relative_to(DEPLOY).as_posix() for f in manifest_files()}
    assert {"base/deployment.yaml", "base/service.yaml", "base/configmap.yaml"} <= names
    # Patches are partial on purpose and are validated through the rendered output.
    assert "overlays/vllm/model-server.yaml" not in names


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("path", manifest_files(), ids=lambda p: p.relative_to(DEPLOY).as_posix())
def test_every_manifest_validates(path: Path, version: str) -> None:
    docs = load_docs(path)
    assert docs, f"{path}: no document"
    for doc in docs:
        assert_valid(doc, version, path.relative_to(REPO_ROOT).as_posix())


@pytest.mark.parametrize("version", K8S_VERSIONS)
@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_every_rendered_output_validates(name: str, version: str) -> None:
    docs = render(KUSTOMIZATIONS[name])
    kinds = sorted(d["kind"] for d in docs)
    assert kinds == sorted(
        [
            "Certificate",
            "ConfigMap",
            "Deployment",
            "Issuer",
            "NetworkPolicy",
            "PodDisruptionBudget",
            "Service",
            "Service",
            "ServiceMonitor",
            "PrometheusRule",
        ]
    )
    for doc in docs:
        assert_valid(doc, version, name)


def test_the_validator_is_strict() -> None:
    """A misspelt field fails: validation that passes everything would prove nothing."""
    deployment = Rendered(render(BASE)).deployment
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["initContainers"][0]["restartPolicyy"] = "Always"
    with pytest.raises(ValidationError):
        validate(broken, K8S_VERSIONS[0], strict=True)
    # So is a wrong type.
    broken = json.loads(json.dumps(deployment))
    broken["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] = "150s"
    with pytest.raises(ValidationError):
        validate(broken, K8S_VERSIONS[0], strict=True)


def _normalise(value: Any) -> Any:
    # Both renderers agree on content; a merged list's order may differ.
    if isinstance(value, dict):
        return {k: _normalise(v) for k, v in value.items()}
    if isinstance(value, list):
        items = [_normalise(v) for v in value]
        for key in ("name", "mountPath", "containerPort"):
            if items and all(isinstance(i, dict) and key in i for i in items):
                return sorted(items, key=lambda i: str(i[key]))
        return items
    return value


def _sorted_docs(docs: list[Doc]) -> list[Doc]:
    return sorted((_normalise(d) for d in docs), key=lambda d: (d["kind"], d["metadata"]["name"]))


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_render_matches_kubectl_kustomize(name: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: render() is checked against it where it is")
    result = subprocess.run(
        [kubectl, "kustomize", str(KUSTOMIZATIONS[name])],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    theirs = [d for d in yaml.safe_load_all(result.stdout) if d]
    assert _sorted_docs(render(KUSTOMIZATIONS[name])) == _sorted_docs(theirs)


def test_images_are_pinned(rendered: Rendered) -> None:
    for container in every_container(rendered):
        _, suffix = split_image(container["image"])
        assert suffix and suffix != ":latest", container["image"]
    # The pqproxy image of the sidecar is the one the Dockerfile builds, at pqproxy's version.
    assert rendered.sidecar["image"].endswith(f"pqproxy:{__version__}")


def test_split_and_set_images() -> None:
    assert split_image("pqproxy") == ("pqproxy", "")
    assert split_image("registry:5000/team/pqproxy") == ("registry:5000/team/pqproxy", "")
    assert split_image("registry:5000/pqproxy:1.2") == ("registry:5000/pqproxy", ":1.2")
    assert split_image("pqproxy@sha256:ab") == ("pqproxy", "@sha256:ab")
    docs: list[Doc] = [
        {
            "kind": "Deployment",
            "spec": {
                "template": {
                    "spec": {
                        "initContainers": [{"name": "a", "image": "pqproxy:0.1.0"}],
                        "containers": [{"name": "b", "image": "other:1"}],
                    }
                }
            },
        }
    ]
    set_images(docs, [{"name": "pqproxy", "newName": "reg.example/pqproxy", "newTag": "2"}])
    pod = docs[0]["spec"]["template"]["spec"]
    assert pod["initContainers"][0]["image"] == "reg.example/pqproxy:2"
    assert pod["containers"][0]["image"] == "other:1"


def test_strategic_merge() -> None:
    base = {
        "containers": [
            {"name": "a", "image": "a:1", "args": ["x"], "env": [{"name": "K", "value": "1"}]},
            {"name": "b", "image": "b:1"},
        ],
        "volumes": [{"name": "v", "emptyDir": {}}],
    }
    patch = {
        "containers": [
            {"name": "a", "args": ["y", "z"], "env": [{"name": "L", "value": "2"}]},
            {"name": "c", "image": "c:1"},
        ],
        "volumes": [{"name": "w", "emptyDir": {}}],
    }
    assert strategic_merge(base, patch) == {
        "containers": [
            {
                "name": "a",
                "image": "a:1",
                "args": ["y", "z"],
                "env": [{"name": "K", "value": "1"}, {"name": "L", "value": "2"}],
            },
            {"name": "b", "image": "b:1"},
            {"name": "c", "image": "c:1"},
        ],
        "volumes": [{"name": "v", "emptyDir": {}}, {"name": "w", "emptyDir": {}}],
    }
    assert strategic_merge({"a": 1, "b": 2}, {"b": None}) == {"a": 1}


# -- the pod ---------------------------------------------------------------------------------------


def every_container(rendered: Rendered) -> list[Doc]:
    containers: list[Doc] = rendered.pod.get("initContainers", []) + rendered.pod["containers"]
    return containers


def test_pqproxy_is_a_native_sidecar(rendered: Rendered) -> None:
    init = rendered.pod["initContainers"]
    assert [c["name"] for c in init] == [SIDECAR]
    sidecar = rendered.sidecar
    assert sidecar["restartPolicy"] == "Always"
    # The image's entrypoint runs: pqproxy serve --config /etc/pqproxy/pqproxy.yaml.
    assert "command" not in sidecar and "args" not in sidecar
    assert [c["name"] for c in rendered.pod["containers"]] == [MODEL_SERVER]


def test_pod_security(rendered: Rendered) -> None:
    pod = rendered.pod
    pod_context = pod["securityContext"]
    assert pod.get("automountServiceAccountToken") is False
    for host in ("hostNetwork", "hostPID", "hostIPC"):
        assert not pod.get(host), host
    assert all("hostPath" not in volume for volume in pod["volumes"])
    for container in every_container(rendered):
        name = container["name"]
        context = container.get("securityContext", {})

        def effective(key: str, context: Doc = context) -> Any:
            return context.get(key, pod_context.get(key))

        assert effective("runAsNonRoot") is True, name
        assert effective("runAsUser") not in (None, 0), name
        assert effective("seccompProfile") == {"type": "RuntimeDefault"}, name
        assert context.get("readOnlyRootFilesystem") is True, name
        assert context.get("allowPrivilegeEscalation") is False, name
        assert context.get("privileged") is not True, name
        assert context.get("capabilities") == {"drop": ["ALL"]}, name


def test_every_container_has_resources(rendered: Rendered) -> None:
    for container in every_container(rendered):
        resources = container["resources"]
        assert {"cpu", "memory"} <= set(resources["requests"]), container["name"]
        # Memory is the limit that protects the node; CPU limits only throttle handshakes.
        assert "memory" in resources["limits"], container["name"]


def test_probes_are_on_the_admin_port(rendered: Rendered) -> None:
    sidecar = rendered.sidecar
    ports = {p["name"]: p["containerPort"] for p in sidecar["ports"]}
    config = rendered.config
    assert config.admin is not None
    assert ports[ADMIN_PORT_NAME] == config.admin.port == DEFAULT_ADMIN_PORT
    # The kubelet probes the pod IP, so the admin endpoint must listen beyond loopback.
    assert config.admin.host in ("0.0.0.0", "::")
    expected = {
        "startupProbe": "/healthz",
        "readinessProbe": "/readyz",
        "livenessProbe": "/healthz",
    }
    for probe, path in expected.items():
        assert sidecar[probe]["httpGet"] == {"path": path, "port": ADMIN_PORT_NAME}, probe


def test_the_config_is_mounted_where_the_entrypoint_reads_it(rendered: Rendered) -> None:
    mounts = {m["mountPath"]: m for m in rendered.sidecar["volumeMounts"]}
    config_mount = mounts[ENTRYPOINT[-1]]
    assert config_mount["subPath"] == CONFIG_KEY
    volume = rendered.volume(config_mount["name"])
    assert volume["configMap"]["name"] == rendered.one("ConfigMap")["metadata"]["name"]
    # pqproxy writes nothing else but its multiprocess metrics under /tmp.
    assert "/tmp" in mounts
    assert "emptyDir" in rendered.volume(mounts["/tmp"]["name"])


def test_the_certificate_secret_is_mounted_for_rotation(rendered: Rendered) -> None:
    config = rendered.config
    (listener,) = config.listeners
    (cert,) = listener.tls.certificates
    mounts = [m for m in rendered.sidecar["volumeMounts"] if "secret" in rendered.volume(m["name"])]
    (mount,) = mounts
    # A subPath mount never sees a renewed Secret: a directory mount does (..data swap).
    assert "subPath" not in mount
    assert mount.get("readOnly") is True
    directory = Path(mount["mountPath"])
    # cert-manager (and `kubectl create secret tls`) name the keys tls.crt and tls.key.
    assert (cert.cert, cert.key) == (directory / "tls.crt", directory / "tls.key")
    secret_name = rendered.volume(mount["name"])["secret"]["secretName"]
    certificate = rendered.one("Certificate")
    assert certificate["spec"]["secretName"] == secret_name
    assert certificate["spec"]["privateKey"]["rotationPolicy"] == "Always"
    issuer_ref = certificate["spec"]["issuerRef"]
    if issuer_ref["kind"] == "Issuer":
        rendered.one("Issuer", issuer_ref["name"])
    assert certificate["spec"]["dnsNames"]
    # Rotation needs the watch on. PENDING: until Config has cert_watch, there is no field.
    fields = dataclasses.asdict(config)
    if "cert_watch" in fields:
        assert fields["cert_watch"] is not None, "cert_watch is off: renewals would be missed"


def test_the_listener_is_pqproxys_tls_port(rendered: Rendered) -> None:
    (listener,) = rendered.config.listeners
    ports = {p["name"]: p["containerPort"] for p in rendered.sidecar["ports"]}
    assert set(ports) == {TLS_PORT_NAME, ADMIN_PORT_NAME}
    assert listener.listen.port == ports[TLS_PORT_NAME]
    assert listener.listen.host in ("0.0.0.0", "::")


# Where each model server is told to listen: its flags or environment, by overlay.
MODEL_SERVER_BINDS = {
    "base": {"args": ["--listen", "127.0.0.1:8000"]},
    "vllm": {"args": ["--host=127.0.0.1", "--port=8000"]},
    "ollama": {"env": ["OLLAMA_HOST=127.0.0.1:11434"]},
    "triton": {
        "args": ["--http-address=127.0.0.1", "--grpc-address=127.0.0.1", "--grpc-port=8001"]
    },
}


@pytest.mark.parametrize("name", sorted(KUSTOMIZATIONS))
def test_the_model_server_listens_on_loopback_only(name: str) -> None:
    rendered = Rendered(render(KUSTOMIZATIONS[name]))
    model = rendered.model_server
    args = [str(a) for a in model.get("args", [])]
    env = [f"{e['name']}={e.get('value', '')}" for e in model.get("env", [])]
    expected = MODEL_SERVER_BINDS[name]
    for item in expected.get("args", []):
        assert item in args, (name, item)
    for item in expected.get("env", []):
        assert item in env, (name, item)
    for value in args + env:
        assert "0.0.0.0" not in value and "[::]" not in value, (name, value)
    assert "ports" not in model  # nothing of it is meant to be reached from outside the pod
    config = rendered.config
    (listener,) = config.listeners
    for server in config.upstream_for(listener).servers:
        assert server.host == "127.0.0.1"
        assert any(str(server.port) in item for item in args + env), (name, server)


def test_the_service_exposes_only_the_tls_port(rendered: Rendered) -> None:
    labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    services = rendered.all("Service")
    selecting = [s for s in services if s["spec"]["selector"].items() <= labels.items()]
    assert len(selecting) == len(services) == 2
    clients = [s for s in services if s["spec"].get("clusterIP") != "None"]
    (client,) = clients
    assert client["spec"].get("type", "ClusterIP") == "ClusterIP"
    assert [p["targetPort"] for p in client["spec"]["ports"]] == [TLS_PORT_NAME]
    # The other one is headless, for the ServiceMonitor: the admin port only.
    (metrics,) = [s for s in services if s["spec"].get("clusterIP") == "None"]
    assert [p["targetPort"] for p in metrics["spec"]["ports"]] == [ADMIN_PORT_NAME]


def test_the_network_policy_admits_only_pqproxy(rendered: Rendered) -> None:
    labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    policy = rendered.one("NetworkPolicy")["spec"]
    assert policy["podSelector"]["matchLabels"].items() <= labels.items()
    assert "Ingress" in policy["policyTypes"]
    by_port: dict[str, list[Doc]] = {}
    for rule in policy["ingress"]:
        for port in rule["ports"]:
            by_port.setdefault(port["port"], []).append(rule)
    assert set(by_port) == {TLS_PORT_NAME, ADMIN_PORT_NAME}
    # Metrics only from the monitoring namespace, never from everyone.
    for rule in by_port[ADMIN_PORT_NAME]:
        assert rule.get("from"), rule


def test_selectors_match_the_pod(rendered: Rendered) -> None:
    deployment = rendered.deployment
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert deployment["spec"]["selector"]["matchLabels"].items() <= labels.items()
    pdb = rendered.one("PodDisruptionBudget")["spec"]
    assert pdb["selector"]["matchLabels"].items() <= labels.items()
    # One replica may go at a time; with a single replica a drain would block forever.
    assert pdb["maxUnavailable"] == 1 and deployment["spec"]["replicas"] >= 2
    monitor = rendered.one("ServiceMonitor")["spec"]
    (metrics,) = [s for s in rendered.all("Service") if s["spec"].get("clusterIP") == "None"]
    assert monitor["selector"]["matchLabels"].items() <= metrics["metadata"]["labels"].items()
    (endpoint,) = monitor["endpoints"]
    assert endpoint["port"] in [p["name"] for p in metrics["spec"]["ports"]]
    assert endpoint["path"] == "/metrics"


def test_shutdown_fits_the_grace_period(rendered: Rendered) -> None:
    """Pod deletion: the model server's preStop waits out the endpoint propagation while
    pqproxy serves on, the model server finishes its requests, then pqproxy (a native sidecar
    stops last) drains for at most drain_timeout and closes within EXIT_GRACE."""
    pod = rendered.pod
    pre_stop = rendered.model_server["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep"
    delay = int(pre_stop[1])
    assert 5 <= delay <= 30
    drain = rendered.config.drain_timeout
    grace = pod["terminationGracePeriodSeconds"]
    assert grace >= delay + drain + EXIT_GRACE
    # ...and not so much more that a stuck pod lingers for nothing.
    assert grace <= delay + drain + EXIT_GRACE + 30
    # pqproxy itself needs no preStop: by the time it is stopped, no new client arrives.
    assert "lifecycle" not in rendered.sidecar


def test_triton_is_relayed_as_tcp_with_h2() -> None:
    rendered = Rendered(render(OVERLAYS["triton"]))
    (listener,) = rendered.config.listeners
    assert listener.mode is Mode.TCP
    assert listener.tls.alpn == ("h2",)
    args = rendered.model_server["args"]
    # Triton's own shutdown waits as long as pqproxy's drain.
    assert f"--exit-timeout-secs={int(rendered.config.drain_timeout)}" in args


@pytest.mark.parametrize("name", ["vllm", "ollama"])
def test_http_model_servers_are_health_checked(name: str) -> None:
    """/readyz reports a model server that does not answer: the kubelet cannot reach one on
    127.0.0.1 itself, so pqproxy's health check is what keeps a loading pod unready."""
    config = Rendered(render(OVERLAYS[name])).config
    (listener,) = config.listeners
    assert listener.mode is Mode.HTTP
    assert config.upstream_for(listener).health_check is not None


# -- the Dockerfile --------------------------------------------------------------------------------

DOCKERFILE = REPO_ROOT / "Dockerfile"
BUILD_TOOLS = (
    "build-essential",
    "gcc",
    "g++",
    "clang",
    "make",
    "cmake",
    "ninja",
    "ninja-build",
    "git",
    "libc6-dev",
)


@dataclass
class Instruction:
    keyword: str
    args: str


@dataclass
class Stage:
    base: str
    name: str | None
    instructions: list[Instruction] = field(default_factory=list)

    def all(self, keyword: str) -> list[Instruction]:
        return [i for i in self.instructions if i.keyword == keyword]

    def args(self) -> dict[str, str | None]:
        values: dict[str, str | None] = {}
        for instruction in self.all("ARG"):
            name, _, default = instruction.args.partition("=")
            values[name] = default if _ else None
        return values


@dataclass
class Dockerfile:
    global_args: dict[str, str | None]
    stages: list[Stage]

    def stage(self, name: str) -> Stage:
        (found,) = [s for s in self.stages if s.name == name]
        return found

    @property
    def final(self) -> Stage:
        return self.stages[-1]

    def resolve(self, text: str, extra: dict[str, str] | None = None) -> str:
        values = {k: v for k, v in self.global_args.items() if v is not None} | (extra or {})
        return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values[m.group(1) or m.group(2)], text)


def instructions(text: str) -> Iterator[Instruction]:
    """Instructions with their continuation lines joined; comment lines dropped (Docker
    drops them inside a continuation too)."""
    logical = ""
    for line in text.splitlines():
        if line.lstrip().startswith("#"):
            continue
        if line.endswith("\\"):
            logical += line[:-1] + " "
            continue
        logical += line
        if logical.strip():
            keyword, _, args = logical.strip().partition(" ")
            yield Instruction(keyword.upper(), " ".join(args.split()))
        logical = ""
    assert not logical.strip(), "the Dockerfile ends inside a continuation"


def parse_dockerfile(path: Path = DOCKERFILE) -> Dockerfile:
    global_args: dict[str, str | None] = {}
    stages: list[Stage] = []
    for instruction in instructions(path.read_text(encoding="utf-8")):
        if instruction.keyword == "FROM":
            match = re.fullmatch(r"(\S+)(?: AS (\S+))?", instruction.args, re.IGNORECASE)
            assert match, instruction
            stages.append(Stage(match.group(1), match.group(2)))
        elif not stages:
            assert instruction.keyword == "ARG", f"before the first FROM: {instruction}"
            name, sep, default = instruction.args.partition("=")
            global_args[name] = default if sep else None
        else:
            stages[-1].instructions.append(instruction)
    return Dockerfile(global_args, stages)


def exec_form(instruction: Instruction) -> list[str]:
    value = json.loads(instruction.args)
    assert isinstance(value, list) and all(isinstance(v, str) for v in value), instruction
    return value


def run_commands(stage: Stage) -> str:
    return "\n".join(i.args for i in stage.all("RUN"))


def test_the_dockerfile_parser(tmp_path: Path) -> None:
    text = "ARG A=1\nFROM x:${A} AS one\n# c\nRUN a \\\n  # inner\n  b\nFROM one\nUSER 5\n"
    path = tmp_path / "Dockerfile"
    path.write_text(text, encoding="utf-8")
    parsed = parse_dockerfile(path)
    assert parsed == Dockerfile(
        {"A": "1"},
        [
            Stage("x:${A}", "one", [Instruction("RUN", "a b")]),
            Stage("one", None, [Instruction("USER", "5")]),
        ],
    )
    assert parsed.resolve(parsed.stages[0].base) == "x:1"
    assert parsed.final.name is None


def test_the_image_is_multi_stage_on_a_slim_python() -> None:
    dockerfile = parse_dockerfile()
    assert len(dockerfile.stages) >= 2
    final = dockerfile.final
    base = dockerfile.resolve(final.base)
    # The final stage starts from the slim image itself, not from a stage that might have
    # had build tools installed.
    assert final.base not in {s.name for s in dockerfile.stages}
    assert re.fullmatch(r"python:3\.(1[1-9])-slim(-\w+)?", base), base
    build = dockerfile.stage("build")
    assert dockerfile.resolve(build.base) == base  # the venv's python is the final python


def test_the_final_stage_runs_as_a_non_root_user() -> None:
    final = parse_dockerfile().final
    users = final.all("USER")
    assert users, "no USER in the final stage: it would run as root"
    user, _, group = users[-1].args.partition(":")
    assert user.isdigit() and int(user) >= 1000, user
    assert not group or (group.isdigit() and int(group) != 0)
    # The same uid as the pod's securityContext.
    pod = Rendered(render(BASE)).pod
    assert pod["securityContext"]["runAsUser"] == int(user)
    # Nothing after USER switches back.
    index = final.instructions.index(users[-1])
    assert all(i.keyword != "USER" for i in final.instructions[index + 1 :])


def test_no_build_tools_in_the_final_stage() -> None:
    dockerfile = parse_dockerfile()
    final = dockerfile.final
    commands = run_commands(final)
    assert "apt-get install" not in commands and "pip install" not in commands
    words = set(re.findall(r"[\w+.-]+", commands))
    assert not words & set(BUILD_TOOLS), words & set(BUILD_TOOLS)
    # What is copied in comes from stages that need no compiler either (the venv: wheels
    # only), or is the liboqs shared library alone.
    sources = {
        re.search(r"--from=(\S+)", i.args).group(1)  # type: ignore[union-attr]
        for i in final.all("COPY")
        if "--from=" in i.args
    }
    assert sources == {"build", "liboqs"}
    build_words = set(re.findall(r"[\w+.-]+", run_commands(dockerfile.stage("build"))))
    assert not build_words & set(BUILD_TOOLS)
    (liboqs_copy,) = [i for i in final.all("COPY") if "--from=liboqs" in i.args]
    assert liboqs_copy.args.split()[1:] == ["/opt/liboqs/lib", "/opt/liboqs/lib"]


def test_liboqs_is_an_optional_stage_from_a_pinned_release() -> None:
    dockerfile = parse_dockerfile()
    assert dockerfile.global_args["WITH_LIBOQS"] == "0"
    # FROM liboqs-build-${WITH_LIBOQS}: 0 picks an empty stage, 1 the build.
    (selector,) = [s for s in dockerfile.stages if s.name == "liboqs"]
    assert dockerfile.resolve(selector.base) == "liboqs-build-0"
    assert dockerfile.resolve(selector.base, {"WITH_LIBOQS": "1"}) == "liboqs-build-1"
    empty = dockerfile.stage("liboqs-build-0")
    assert empty.base == "scratch"
    assert [i.keyword for i in empty.instructions] == ["WORKDIR"]
    assert empty.instructions[0].args == "/opt/liboqs/lib"
    build = dockerfile.stage("liboqs-build-1")
    args = build.args()
    version, digest = args["LIBOQS_VERSION"], args["LIBOQS_SHA256"]
    assert version is not None and re.fullmatch(r"\d+\.\d+\.\d+", version), version
    assert digest is not None and re.fullmatch(r"[0-9a-f]{64}", digest), digest
    # The same release the repository's own build script pins.
    script = (REPO_ROOT / "scripts" / "build-liboqs.sh").read_text(encoding="utf-8")
    assert f"/archive/refs/tags/{version}.tar.gz" in script
    commands = run_commands(build)
    assert "LIBOQS_SHA256=" in commands and "build-liboqs.sh" in commands
    # Only the shared library goes where the final stage copies from.
    copies = re.findall(r"cp -a (\S+) /opt/liboqs/lib/", commands)
    assert copies and all(src.endswith("/liboqs.so*") for src in copies), copies
    # The liboqs backend is installed only with the library.
    build_stage = run_commands(dockerfile.stage("build"))
    assert re.search(r'if \[ "\$WITH_LIBOQS" = 1 \]; then extras="\[liboqs\]"', build_stage)
    final_env = " ".join(i.args for i in dockerfile.final.all("ENV"))
    assert "OQS_INSTALL_PATH=/opt/liboqs" in final_env


def test_the_healthcheck_asks_the_admin_endpoint() -> None:
    final = parse_dockerfile().final
    (check,) = final.all("HEALTHCHECK")
    options, _, command = check.args.partition("CMD ")
    assert "--interval=" in options and "--timeout=" in options
    argv = json.loads(command)
    # The slim image has no curl or wget: Python's urllib does the request.
    assert argv[:2] == ["python", "-c"]
    assert f"http://127.0.0.1:{DEFAULT_ADMIN_PORT}/healthz" in argv[2]
    assert "curl" not in check.args and "wget" not in check.args


def test_entrypoint_and_ports() -> None:
    dockerfile = parse_dockerfile()
    final = dockerfile.final
    (entrypoint,) = final.all("ENTRYPOINT")
    assert exec_form(entrypoint) == ENTRYPOINT
    # `pqproxy` is the venv's script, found through PATH.
    env = " ".join(i.args for i in final.all("ENV"))
    assert re.search(r"PATH=/opt/pqproxy/bin:", env)
    assert "python -m venv /opt/pqproxy" in run_commands(dockerfile.stage("build"))
    exposed = {int(p.split("/")[0]) for i in final.all("EXPOSE") for p in i.args.split()}
    (listener,) = Rendered(render(BASE)).config.listeners
    assert exposed == {listener.listen.port, DEFAULT_ADMIN_PORT}


# -- .dockerignore ---------------------------------------------------------------------------------


def _pattern(pattern: str) -> re.Pattern[str]:
    # Docker's syntax: * and ? stay within a path element, ** crosses them.
    out = ""
    i = 0
    while i < len(pattern):
        if pattern.startswith("**/", i):
            out += "(?:.*/)?"
            i += 3
        elif pattern.startswith("**", i):
            out += ".*"
            i += 2
        elif pattern[i] == "*":
            out += "[^/]*"
            i += 1
        elif pattern[i] == "?":
            out += "[^/]"
            i += 1
        else:
            out += re.escape(pattern[i])
            i += 1
    return re.compile(out)


def sent_to_docker(path: str, rules: list[str]) -> bool:
    """Whether the build context holds ``path``: the last rule matching the path or one of
    its parent directories decides (a ``!`` rule includes)."""
    parts = path.split("/")
    candidates = ["/".join(parts[: n + 1]) for n in range(len(parts))]
    included = True
    for rule in rules:
        negated = rule.startswith("!")
        pattern = _pattern(rule.lstrip("!").strip("/"))
        if any(pattern.fullmatch(c) for c in candidates):
            included = negated
    return included


def dockerignore_rules() -> list[str]:
    text = (REPO_ROOT / ".dockerignore").read_text(encoding="utf-8")
    return [line.strip() for line in text.splitlines() if line.strip() and line[0] != "#"]


def test_dockerignore_sends_only_what_the_image_needs() -> None:
    rules = dockerignore_rules()
    for copied in ("pyproject.toml", "README.md", "scripts/build-liboqs.sh"):
        assert sent_to_docker(copied, rules), copied
    package = [
        p.relative_to(REPO_ROOT).as_posix()
        for p in (REPO_ROOT / "pqproxy").rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    ]
    assert package and all(sent_to_docker(p, rules) for p in package)
    for private in (
        ".venv/bin/python",
        ".git/config",
        ".demo/certs/server.key",
        ".cache/node-peer/package.json",
        "tests/unit/test_config.py",
        "config/pqproxy.yaml",
        "deploy/base/deployment.yaml",
        "scripts/install-test-peers.sh",
        "pqproxy/__pycache__/cli.cpython-311.pyc",
        "server.key",
    ):
        assert not sent_to_docker(private, rules), private
    # Every COPY source of the Dockerfile is in the context.
    for stage in parse_dockerfile().stages:
        for copy in stage.all("COPY"):
            if "--from=" in copy.args:
                continue
            for source in copy.args.split()[:-1]:
                assert sent_to_docker(source.rstrip("/"), rules), source
                assert (REPO_ROOT / source).exists(), source


def test_dockerignore_matcher() -> None:
    rules = ["*", "!keep/", "**/*.pyc"]
    assert sent_to_docker("keep/a.py", rules)
    assert not sent_to_docker("keep/sub/a.pyc", rules)
    assert not sent_to_docker("other/a.py", rules)
    # Unlike fnmatch's, a * stays within one path element.
    assert not _pattern("*").fullmatch("a/b")
    assert _pattern("**/*.pyc").fullmatch("a/b/c.pyc")
