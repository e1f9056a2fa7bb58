"""The Helm chart (helm/loraserve), rendered offline by Helm's own Go SDK (helm-python-sdk) and
held to the Kubernetes API schemas (kubernetes-validate), to the server's real command line, and
to what a shared-store GPU deployment needs. No cluster, no helm binary, no network.

Scenarios are the chart's `ci/*-values.yaml` files plus the defaults.
"""

from __future__ import annotations

import argparse
import base64
import json
from functools import cache
from pathlib import Path

import helm_python
import kubernetes_validate
import pytest
import yaml
from helm_python import _native

from loraserve.cli import build_parser
from loraserve.settings import SETTINGS
from loraserve.trainer.config import resolve as resolve_train_config

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "helm" / "loraserve"
KUBE_VERSION = kubernetes_validate.utils.latest_version()  # the newest schemas it bundles
RELEASE, NAMESPACE = "ci", "ml"
PROMETHEUS_OPERATOR = "monitoring.coreos.com/v1"
SCENARIOS = ["default", *sorted(p.name.removesuffix("-values.yaml") for p in (CHART / "ci").glob("*-values.yaml"))]
STANDARD_LABELS = ("app.kubernetes.io/name", "app.kubernetes.io/instance", "app.kubernetes.io/version",
                   "app.kubernetes.io/managed-by")


@cache
def _chart() -> helm_python.Chart:
    return helm_python.Chart.load(CHART)


def scenario_values(name: str) -> dict:
    return {} if name == "default" else yaml.safe_load((CHART / "ci" / f"{name}-values.yaml").read_text())


def render_files(values: dict | None = None, api_versions: tuple[str, ...] = ()) -> dict[str, str]:
    """{template: text}, as `helm install` renders it on a cluster of KUBE_VERSION serving
    `api_versions`. Chart.render (helm-python-sdk 0.2.2, pinned) has no keyword for the
    capabilities, but the C ABI's render options take them, as `helm template --kube-version
    --api-versions` does; the ServiceMonitor tests show that they arrive."""
    options = {"name": RELEASE, "namespace": NAMESPACE, "is_install": True, "kube_version": f"v{KUBE_VERSION}",
               "api_versions": list(api_versions)}
    return json.loads(_native.call_string("helm_render", _chart()._raw(), json.dumps(values or {}),
                                          json.dumps(options)))


def render(values: dict | None = None, api_versions: tuple[str, ...] = ()) -> list[dict]:
    """Every object the chart renders, parsed."""
    return [doc for name, text in sorted(render_files(values, api_versions).items()) if not name.endswith(".txt")
            for doc in yaml.safe_load_all(text) if doc]


@cache
def _scenario_objects(name: str, with_operator: bool) -> str:
    api = (PROMETHEUS_OPERATOR,) if with_operator else ()
    return json.dumps(render(scenario_values(name), api))


def scenario(name: str, with_operator: bool = True) -> list[dict]:
    return json.loads(_scenario_objects(name, with_operator))  # a fresh copy per test


def one(objects: list[dict], kind: str) -> dict:
    found = [o for o in objects if o["kind"] == kind]
    assert len(found) == 1, f"{len(found)} objects of kind {kind}"
    return found[0]


def pod_specs(objects: list[dict]) -> list[dict]:
    return [o["spec"]["template"]["spec"] for o in objects if o["kind"] in ("Deployment", "Job")]


def server_container(objects: list[dict]) -> dict:
    return one(objects, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def parse_command(container: dict):
    """The container's command line parsed by loraserve's own argparse parser (a wrong flag
    exits with SystemExit)."""
    argv = container["command"] + container.get("args", [])
    assert argv[0] == "loraserve"
    return parse_loraserve(argv[1:])


def parse_loraserve(argv: list[str]):
    """build_parser().parse_args(argv), and every --flag spelled out in full: argparse would
    also accept an abbreviation, which a later flag of the same prefix makes ambiguous."""
    parser = build_parser()
    args = parser.parse_args(argv)
    [subcommands] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    sub = subcommands.choices[args.command]
    known = set(parser._option_string_actions) | set(sub._option_string_actions)
    assert [a for a in argv if a.startswith("--") and a.split("=")[0] not in known] == []
    return args


def volume_of(pod: dict, mount_path: str, container: dict) -> dict:
    mount = next(m for m in container["volumeMounts"] if m["mountPath"] == mount_path)
    return next(v for v in pod["volumes"] if v["name"] == mount["name"])


def container_port(container: dict, name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


# ---------------------------------------------------------------- Helm and Kubernetes validity


def test_ci_scenarios_are_there():
    assert {"gpu-pvc", "monitoring", "autoscaling", "training", "tls-keys", "existing-secrets"} <= set(SCENARIOS)


@pytest.mark.parametrize("name", SCENARIOS)
def test_lint_is_clean(name):
    report = helm_python.lint(CHART, scenario_values(name), strict=True, kube_version=f"v{KUBE_VERSION}")
    assert report["errors"] == []
    # severity 1 is informational (Helm recommends an icon); warnings (2) and errors (3) fail
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("name", SCENARIOS)
def test_every_object_matches_the_kubernetes_schema(name):
    for obj in scenario(name):
        if obj["apiVersion"] == PROMETHEUS_OPERATOR:  # a CRD: checked in its own test below
            continue
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)


@pytest.mark.parametrize("name", SCENARIOS)
def test_standard_labels_on_every_object_and_pod(name):
    app_version = _chart().metadata["appVersion"]
    objects = scenario(name)
    for meta in [o["metadata"] for o in objects] + [o["spec"]["template"]["metadata"] for o in objects
                                                     if o["kind"] in ("Deployment", "Job")]:
        labels = meta["labels"]
        assert all(key in labels for key in STANDARD_LABELS), meta.get("name")
        assert labels["app.kubernetes.io/instance"] == RELEASE and labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["app.kubernetes.io/version"] == app_version


def test_chart_app_version_is_the_package_version():
    from loraserve import __version__

    assert _chart().metadata["appVersion"] == __version__


# ---------------------------------------------------------------- the server's command line


@pytest.mark.parametrize("name", SCENARIOS)
def test_server_args_are_real_serve_flags(name):
    from loraserve.settings import resolve

    objects = scenario(name)
    container = server_container(objects)
    args = parse_command(container)
    assert args.command == "serve"
    settings = resolve(args, environ={})  # the server's own validation, as at start-up
    assert settings.port == container_port(container, "grpc")
    assert settings.metrics_port == container_port(container, "metrics")
    assert settings.adapters_dir == "/var/lib/loraserve/adapters"


def test_values_reach_their_flags():
    values = scenario_values("gpu-pvc")["server"]
    args = parse_command(server_container(scenario("gpu-pvc")))
    assert args.log_level == "INFO" and args.model == "deepseek-ai/DeepSeek-V2-Lite-Chat"
    assert (args.quantization, args.dtype, args.max_loras, args.max_cpu_loras) == ("int8", "bfloat16", 8, 64)
    assert (args.max_lora_rank, args.max_batch_size, args.max_queue) == (128, 64, 1024)
    assert (args.max_input_tokens, args.max_new_tokens) == (8192, 1024)
    assert (args.max_adapter_bytes, args.max_store_bytes) == (4294967296, 107374182400)
    assert (args.drain_timeout, args.store_sync_interval) == (120.0, 5.0)
    assert (args.preload, args.pin, args.import_roots) == (values["preload"], values["pin"], ["/mnt/imports"])
    odd = parse_command(server_container(render({"server": {"drainTimeout": 7.5, "allowOpenManagement": True,
                                                                     "refusalHold": 0.25,
                                                                     "extraArgs": ["--max-queue", "9"]}})))
    assert odd.drain_timeout == 7.5 and odd.allow_open_management is True and odd.max_queue == 9
    assert odd.refusal_hold == 0.25 and parse_command(server_container(render({}))).refusal_hold == 1.0


def test_vllm_values_reach_their_flags():
    args = parse_command(server_container(scenario("vllm-tp")))
    assert (args.engine, args.quantization, args.tensor_parallel_size, args.pipeline_parallel_size) == \
        ("vllm", "nf4", 2, 1)
    assert (args.gpu_memory_utilization, args.max_model_len, args.vllm_cpu_kv_cache_gib) == (0.85, 16384, 0)
    assert args.enable_prefix_caching is False and args.enable_chunked_prefill is True
    assert (args.long_prefill_token_threshold, args.max_num_batched_tokens) == (512, 0)
    default = parse_command(server_container(render({})))
    assert default.engine == "auto" and default.enable_prefix_caching is True
    assert server_container(scenario("vllm-tp"))["resources"]["limits"]["nvidia.com/gpu"] == 2


# Settings the chart derives from other values instead of a `server.<camelCase>` key.
DERIVED_SETTINGS = {"model": "model", "adapters_dir": "adapterStore.mountPath", "api_keys_file": "apiKeys",
                    "tls_cert": "tls", "tls_key": "tls", "tls_client_ca": "tls.clientAuth"}


def test_every_serve_setting_is_a_value():
    server_values = set(_chart().values["server"]) - {"logLevel", "extraArgs"}
    camel = {s.name: s.name.split("_")[0] + "".join(w.title() for w in s.name.split("_")[1:]) for s in SETTINGS}
    assert {camel[n] for n in camel if n not in DERIVED_SETTINGS} == server_values
    defaults = _chart().values["server"]
    for s in SETTINGS:  # the chart's defaults are the server's, so an empty values file changes nothing
        if s.name not in DERIVED_SETTINGS:
            assert defaults[camel[s.name]] == s.default, s.name


# ---------------------------------------------------------------- probes, drain, GPU, security


def test_probes_are_native_grpc_on_the_server_port():
    container = server_container(scenario("default"))
    port = container_port(container, "grpc")
    # Readiness (and start-up) ask whether the server takes requests; liveness only whether its
    # engine is alive: a draining or loading server is not restarted (test_health_and_overload_e2e).
    expected = {"startupProbe": "readiness", "readinessProbe": "readiness", "livenessProbe": "liveness"}
    for probe, service in expected.items():
        assert container[probe]["grpc"] == {"port": port, "service": service}
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30 * 60  # a large model loads for minutes
    longer = server_container(render({"probes": {"startup": {"periodSeconds": 20, "failureThreshold": 540,
                                                               "timeoutSeconds": 5}}}))
    assert longer["startupProbe"]["failureThreshold"] == 540


@pytest.mark.parametrize("name", ["tls-keys", "existing-secrets"])
def test_probes_with_tls_run_loraserve_health_over_tls(name):
    """The kubelet's gRPC probe cannot do a TLS handshake: with TLS the probes run the client."""
    objects = scenario(name)
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = server_container(objects)
    mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
    for probe, service in (("startupProbe", "readiness"), ("readinessProbe", "readiness"),
                           ("livenessProbe", "liveness")):
        assert "grpc" not in container[probe]
        health = parse_loraserve(container[probe]["exec"]["command"][1:])
        assert health.command == "health" and health.server == f"127.0.0.1:{container_port(container, 'grpc')}"
        assert health.service == service
        assert health.timeout == container[probe]["timeoutSeconds"]
        for path in (health.tls_ca, health.tls_cert, health.tls_key):  # mTLS: the probe has a client cert
            volume = next(v for v in pod["volumes"] if v["name"] == mounts[str(Path(path).parent)])
            assert "secret" in volume
    assert parse_loraserve(container["readinessProbe"]["exec"]["command"][1:]).tls_server_name == (
        "loraserve.example.internal" if name == "tls-keys" else f"{RELEASE}-loraserve.{NAMESPACE}.svc")


def test_grace_period_outlasts_the_drain():
    for name, drain in (("default", 30), ("gpu-pvc", 120)):
        pod = one(scenario(name), "Deployment")["spec"]["template"]["spec"]
        sleep = pod["containers"][0]["lifecycle"]["preStop"]["sleep"]["seconds"]
        assert pod["terminationGracePeriodSeconds"] > sleep + drain
    explicit = one(render({"terminationGracePeriodSeconds": 36}), "Deployment")
    assert explicit["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 36


@pytest.mark.parametrize("values", [{"terminationGracePeriodSeconds": 35},
                                    {"terminationGracePeriodSeconds": 20},
                                    {"terminationGracePeriodSeconds": 60, "server": {"drainTimeout": 58}}])
def test_grace_period_not_above_the_drain_fails(values):
    with pytest.raises(helm_python.HelmRenderError, match="must be longer than preStopSleepSeconds"):
        render(values)


def test_gpu_requests_and_limits():
    for name, count in (("default", 1), ("gpu-pvc", 2), ("training", 1)):
        for pod in pod_specs(scenario(name)):
            resources = pod["containers"][0]["resources"]
            assert resources["limits"]["nvidia.com/gpu"] == resources["requests"]["nvidia.com/gpu"] == count
    gpu_pod = one(scenario("gpu-pvc"), "Deployment")["spec"]["template"]["spec"]
    assert gpu_pod["runtimeClassName"] == "nvidia" and gpu_pod["nodeSelector"]
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in gpu_pod["tolerations"]
    cpu_only = server_container(render({"gpu": {"count": 0}}))["resources"]
    assert "nvidia.com/gpu" not in cpu_only.get("limits", {})


@pytest.mark.parametrize("name", SCENARIOS)
def test_pods_run_non_root_on_a_read_only_root(name):
    for pod in pod_specs(scenario(name)):
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        assert pod["automountServiceAccountToken"] is False
        for container in pod["containers"] + pod.get("initContainers", []):
            sc = container["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
            assert sc["capabilities"] == {"drop": ["ALL"]}
        main = pod["containers"][0]
        env = {e["name"]: e.get("value") for e in main["env"]}
        writable = {"/tmp", "/dev/shm", env["HF_HOME"]} if env["HF_HOME"].startswith("/models") else {"/tmp", "/dev/shm"}
        for path in writable | {"/var/lib/loraserve/adapters"}:
            assert not volume_of(pod, path, main).get("persistentVolumeClaim", {}).get("readOnly")
        assert volume_of(pod, "/dev/shm", main)["emptyDir"]["medium"] == "Memory"


# ---------------------------------------------------------------- adapter store and model


def test_store_is_a_shared_claim_mounted_where_adapters_dir_points():
    objects = scenario("default")
    claim = next(o for o in objects if o["kind"] == "PersistentVolumeClaim" and o["metadata"]["name"].endswith("-adapters"))
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    assert claim["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    store = parse_command(pod["containers"][0]).adapters_dir
    assert volume_of(pod, store, pod["containers"][0])["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]

    existing = scenario("existing-secrets")
    assert not [o for o in existing if o["kind"] == "PersistentVolumeClaim"]
    pod = one(existing, "Deployment")["spec"]["template"]["spec"]
    assert volume_of(pod, store, pod["containers"][0])["persistentVolumeClaim"] == {"claimName": "loraserve-adapters"}


def test_model_from_the_hub_and_from_a_read_only_volume():
    hub = server_container(scenario("gpu-pvc"))
    env = {e["name"]: e for e in hub["env"]}
    assert env["HF_HOME"]["value"] == "/models"
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "hf-token", "key": "token"}

    objects = scenario("existing-secrets")
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    assert parse_command(container).model == "/models/deepseek-llm-7b-chat"
    assert volume_of(pod, "/models", container)["persistentVolumeClaim"] == {"claimName": "models-ro", "readOnly": True}
    assert next(m for m in container["volumeMounts"] if m["mountPath"] == "/models")["readOnly"] is True
    assert {"name": "HF_HUB_OFFLINE", "value": "1"} in container["env"]


# ---------------------------------------------------------------- secrets


@pytest.mark.parametrize("name", SCENARIOS)
def test_no_secret_material_in_env(name):
    for pod in pod_specs(scenario(name)):
        for container in pod["containers"] + pod.get("initContainers", []):
            assert "envFrom" not in container
            for var in container.get("env", []):
                assert "BEGIN" not in var.get("value", "") and "sha256:" not in var.get("value", "")
                if "valueFrom" in var:  # only the hub token, by reference
                    assert var["name"] == "HF_TOKEN" and set(var["valueFrom"]) == {"secretKeyRef"}


def test_existing_secrets_are_mounted_as_directories():
    objects = scenario("existing-secrets")
    assert not [o for o in objects if o["kind"] == "Secret"]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    container = pod["containers"][0]
    args = parse_command(container)
    expected = {args.api_keys_file: "loraserve-api-keys", args.tls_cert: "loraserve-tls",
                args.tls_key: "loraserve-tls", args.tls_client_ca: "loraserve-client-ca"}
    for path, secret in expected.items():
        # the file's directory is the mount: a subPath mount would never see a rotated Secret
        assert volume_of(pod, str(Path(path).parent), container)["secret"]["secretName"] == secret
    assert Path(args.api_keys_file).name == "keys.yaml"
    assert not [m for m in container["volumeMounts"] if "subPath" in m]


def test_chart_created_secrets_hold_the_values():
    values = scenario_values("tls-keys")
    objects = scenario("tls-keys")
    secrets = {o["metadata"]["name"]: o for o in objects if o["kind"] == "Secret"}
    data = {name: {k: base64.b64decode(v).decode() for k, v in s["data"].items()} for name, s in secrets.items()}
    assert data["ci-loraserve-api-keys"] == {"keys.yaml": values["apiKeys"]["keysFile"]}
    tls = values["tls"]
    assert data["ci-loraserve-tls"] == {"tls.crt": tls["certificate"], "tls.key": tls["privateKey"], "ca.crt": tls["ca"]}
    assert data["ci-loraserve-client-ca"] == {"ca.crt": tls["clientAuth"]["ca"]}
    assert secrets["ci-loraserve-tls"]["type"] == "kubernetes.io/tls"
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    mounted = {v["secret"]["secretName"] for v in pod["volumes"] if "secret" in v}
    assert mounted == set(secrets)
    args = parse_command(pod["containers"][0])
    assert args.tls_client_ca == "/etc/loraserve/client-ca/ca.crt"


@pytest.mark.parametrize(("values", "message"), [
    ({"apiKeys": {"enabled": True}}, "apiKeys.enabled needs"),
    ({"tls": {"enabled": True}}, "tls.enabled needs"),
    ({"tls": {"enabled": True, "existingSecret": "t", "clientAuth": {"enabled": True}}}, "client certificate for the"),
    ({"tls": {"clientAuth": {"enabled": True}}}, "needs tls.enabled"),
    ({"training": {"enabled": True}}, "training.config.adapter_name"),
    ({"model": {"source": "volume", "path": "m", "volume": {"type": "emptyDir"}}}, "model.source volume"),
    ({"model": {"source": "volume"}}, "model.path"),
    ({"server": {"tensorParallelSize": 2}, "gpu": {"count": 2}}, "only the vllm engine does"),
    ({"server": {"engine": "vllm", "tensorParallelSize": 4}, "gpu": {"count": 2}}, "but gpu.count is 2"),
])
def test_inconsistent_values_fail_with_a_reason(values, message):
    with pytest.raises(helm_python.HelmRenderError, match=message):
        render(values)


# ---------------------------------------------------------------- Service, monitoring, scaling


def test_services_reach_the_server_pods_only():
    objects = scenario("gpu-pvc") + scenario("training")
    for objs in (scenario("gpu-pvc"), scenario("training")):
        pod_labels = one(objs, "Deployment")["spec"]["template"]["metadata"]["labels"]
        for service in [o for o in objs if o["kind"] == "Service"]:
            assert service["spec"]["selector"].items() <= pod_labels.items()
    job_labels = one(scenario("training"), "Job")["spec"]["template"]["metadata"]["labels"]
    services = [o for o in objects if o["kind"] == "Service"]
    assert not [s for s in services if s["spec"]["selector"].items() <= job_labels.items()]
    main = next(s for s in services if s["metadata"]["name"] == "ci-loraserve")
    assert {(p["name"], p["targetPort"]) for p in main["spec"]["ports"]} == {("grpc", "grpc"), ("metrics", "metrics")}
    headless = next(s for s in services if s["metadata"]["name"] == "ci-loraserve-headless")
    assert headless["spec"]["clusterIP"] == "None" and [p["name"] for p in headless["spec"]["ports"]] == ["grpc"]


def test_service_monitor_only_where_the_prometheus_operator_is():
    assert not [o for o in scenario("monitoring", with_operator=False) if o["kind"] == "ServiceMonitor"]
    notes = render_files(scenario_values("monitoring"))["loraserve/templates/NOTES.txt"]
    assert "no ServiceMonitor was created" in notes

    objects = scenario("monitoring")
    monitor = one(objects, "ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["path"] == "/metrics" and endpoint["interval"] == "30s"
    scraped = [s for s in objects if s["kind"] == "Service"
               and monitor["spec"]["selector"]["matchLabels"].items() <= s["metadata"]["labels"].items()]
    assert [s["metadata"]["name"] for s in scraped] == ["ci-loraserve"]
    port = next(p for p in scraped[0]["spec"]["ports"] if p["name"] == endpoint["port"])
    container = server_container(objects)
    assert container_port(container, port["targetPort"]) == parse_command(container).metrics_port
    annotations = one(objects, "Deployment")["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/port"] == str(parse_command(container).metrics_port)


def test_hpa_scales_the_deployment_on_waiting_requests():
    metrics_source = (ROOT / "server" / "api" / "metrics.py").read_text()
    assert '"loraserve_requests_waiting"' in metrics_source  # the series the server exports
    objects = scenario("autoscaling")
    hpa, deployment = one(objects, "HorizontalPodAutoscaler"), one(objects, "Deployment")
    assert hpa["apiVersion"] == "autoscaling/v2" and "replicas" not in deployment["spec"]
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment",
                                             "name": deployment["metadata"]["name"]}
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 8)
    [metric] = hpa["spec"]["metrics"]
    assert metric["type"] == "External" and metric["external"]["metric"]["name"] == "loraserve_requests_waiting"
    assert metric["external"]["metric"]["selector"] == {"matchLabels": {"service": "ci-loraserve", "namespace": "ml"}}
    assert metric["external"]["target"] == {"type": "AverageValue", "averageValue": "8"}

    [pods_metric] = one(render({"autoscaling": {"enabled": True}}), "HorizontalPodAutoscaler")["spec"]["metrics"]
    assert pods_metric["type"] == "Pods" and pods_metric["pods"]["metric"]["name"] == "loraserve_requests_waiting"
    with pytest.raises(helm_python.HelmRenderError, match="maxReplicas 1 is below"):
        render({"autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 1}})


def test_pdb_selects_the_server_pods():
    for name, field, value in (("default", "maxUnavailable", 1), ("autoscaling", "minAvailable", 1)):
        objects = scenario(name)
        pdb, deployment = one(objects, "PodDisruptionBudget"), one(objects, "Deployment")
        assert pdb["spec"][field] == value
        assert pdb["spec"]["selector"] == deployment["spec"]["selector"]
        assert pdb["spec"]["selector"]["matchLabels"].items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
    assert one(render({"podDisruptionBudget": {"maxUnavailable": "25%"}}), "PodDisruptionBudget")["spec"][
        "maxUnavailable"] == "25%"


# ---------------------------------------------------------------- training Job


def test_training_job_publishes_into_the_servers_store(tmp_path):
    objects = scenario("training")
    job, deployment = one(objects, "Job"), one(objects, "Deployment")
    pod, server_pod = job["spec"]["template"]["spec"], deployment["spec"]["template"]["spec"]
    train = pod["containers"][0]
    args = parse_command(train)
    server_args = parse_command(server_pod["containers"][0])
    assert args.command == "train" and args.tenant == "hospital-a"
    assert args.output_dir == server_args.adapters_dir
    assert volume_of(pod, args.output_dir, train) == volume_of(server_pod, server_args.adapters_dir,
                                                              server_pod["containers"][0])
    assert pod["restartPolicy"] == "Never" and job["spec"]["backoffLimit"] == 2
    [wait] = pod["initContainers"]  # publishes only into a store a server has opened
    assert args.output_dir in wait["command"]

    # The ConfigMap's train.yaml is a valid trainer config, on the server's base.
    config_map = volume_of(pod, str(Path(args.config).parent), train)["configMap"]["name"]
    config_text = next(o for o in objects if o["metadata"]["name"] == config_map)["data"]["train.yaml"]
    (tmp_path / "train.yaml").write_text(config_text)
    args.config = str(tmp_path / "train.yaml")
    [config] = resolve_train_config(args).for_tasks()
    assert (config.model, config.quantization) == (server_args.model, server_args.quantization)
    assert (config.adapter_name, config.r, config.output_dir) == ("medical-terms", 8, server_args.adapters_dir)
    data = volume_of(pod, str(Path(config.train_file).parent), train)["configMap"]["name"]
    assert Path(config.train_file).name in next(o for o in objects if o["metadata"]["name"] == data)["data"]


def test_training_job_name_follows_what_it_runs():
    def job_name(values: dict) -> str:
        return one(render(values), "Job")["metadata"]["name"]

    values = scenario_values("training")
    assert job_name(values) == job_name(scenario_values("training"))  # an upgrade leaves it alone
    values["training"]["config"]["r"] = 16
    assert job_name(values) != job_name(scenario_values("training"))  # a Job's pod spec cannot change


# ---------------------------------------------------------------- values and their schema


@pytest.mark.parametrize("values", [
    {"server": {"maxLoras": "8"}},
    {"server": {"quantization": "nf8"}},
    {"server": {"port": 70000}},
    {"server": {"preload": ["../../etc"]}},
    {"replicaCount": -1},
    {"replicas": 2},  # a typo of replicaCount
    {"adapterStore": {"persistence": {"accessModes": ["ReadWriteAll"]}}},
    {"adapterStore": {"persistence": {"accessModes": ["ReadOnlyMany"]}}},  # the store must be writable
    {"tls": {"enabled": "yes"}},
    {"service": {"type": "Ingress"}},
    {"image": {"pullPolicy": "Sometimes"}},
    {"probes": {"startup": {"periodSeconds": 10, "failureThreshold": 0, "timeoutSeconds": 5}}},
    {"autoscaling": {"metric": {"type": "Object"}}},
    {"terminationGracePeriodSeconds": "60"},
    {"model": {"source": "s3"}},
    {"server": {"engine": "tgi"}},
    {"server": {"gpuMemoryUtilization": 1.5}},
    {"server": {"tensorParallelSize": 0}},
])
def test_schema_rejects_wrong_values(values):
    with pytest.raises(helm_python.HelmValuesError):
        _chart().validate_schema(values)
    with pytest.raises(helm_python.HelmValuesError):
        render(values)


# Objects whose keys are Kubernetes' own (documented as a whole, not key by key).
FREE_FORM = {"resources", "podSecurityContext", "securityContext", "behavior", "strategy", "affinity",
             "commonLabels", "podAnnotations", "podLabels", "nodeSelector", "annotations", "labels", "selector",
             "files", "config", "tolerations", "policies"}


def test_every_value_is_commented():
    lines = (CHART / "values.yaml").read_text().splitlines()
    parents: list[tuple[int, str]] = []  # (indent, key) of the enclosing mappings
    for i, line in enumerate(lines):
        stripped = line.lstrip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent, key = len(line) - len(stripped), stripped.split(":")[0]
        parents = [(n, k) for n, k in parents if n < indent]
        if not any(k in FREE_FORM for _, k in parents):
            above = lines[i - 1].strip()
            assert above.startswith("#") or "#" in stripped, f"values.yaml:{i + 1}: {key} has no comment"
        parents.append((indent, key))
