"""The Helm chart (deploy/helm/duplus), rendered and checked offline: no cluster runs here.

``helm lint --strict`` and ``helm template`` with the default values and each example; every rendered
Kubernetes object through ``kubernetes-validate --strict`` against the schemas of one fixed Kubernetes
version (the ServiceMonitor is a CRD, outside those schemas: checked by structure); then what the
manifests do: probes, autoscaling, the two node roles, where passwords come from, the model repository,
and the values the chart refuses with its own message.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from dataclasses import fields
from pathlib import Path
from urllib.parse import urlsplit

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[2]
CHART = ROOT / "deploy" / "helm" / "duplus"
EXAMPLES = CHART / "examples"
RELEASE, NAMESPACE = "duplus", "duplus"
KUBE_VERSION = "1.30.0"
QUEUE_METRIC = "triton_queue_time_us_per_request"
CRD_GROUPS = ("monitoring.coreos.com/",)
# NodeConfig keys the chart writes that another change adds to clients/dicom_node.py; a key leaves this set
# by itself once NodeConfig has it (see node_fields)
PENDING_NODE_KEYS = {"queue_url", "lease_s", "receive"}


def find_helm() -> str | None:
    for candidate in (os.environ.get("HELM"), str(ROOT / ".tools" / "bin" / "helm"), shutil.which("helm")):
        if candidate and Path(candidate).is_file() and os.access(candidate, os.X_OK):
            return candidate
    return None


def find_kubernetes_validate() -> str | None:
    beside = Path(sys.executable).parent / "kubernetes-validate"
    return str(beside) if beside.is_file() else shutil.which("kubernetes-validate")


HELM = find_helm()
KUBERNETES_VALIDATE = find_kubernetes_validate()

pytestmark = pytest.mark.skipif(HELM is None, reason="no helm binary (HELM, .tools/bin/helm or PATH): "
                                                      "`make deploy-tools` installs .tools/bin/helm")

VALUES = {"default": None, "minimal": EXAMPLES / "minimal.yaml", "production": EXAMPLES / "production.yaml"}


def helm(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([HELM, *args], capture_output=True, text=True, timeout=60)


def template(values: Path | None = None, *extra: str) -> subprocess.CompletedProcess:
    args = ["template", RELEASE, str(CHART), "--namespace", NAMESPACE, "--kube-version", KUBE_VERSION]
    if values is not None:
        args += ["--values", str(values)]
    return helm(*args, *extra)


class Render:
    """One ``helm template`` output: its text and its objects."""

    def __init__(self, text: str):
        self.text = text
        self.docs = [d for d in yaml.safe_load_all(text) if d]

    def of_kind(self, kind: str) -> list[dict]:
        return [d for d in self.docs if d["kind"] == kind]

    def get(self, kind: str, name: str) -> dict:
        found = [d for d in self.of_kind(kind) if d["metadata"]["name"] == name]
        assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
        return found[0]

    def container(self, deployment: str) -> dict:
        (c,) = self.get("Deployment", deployment)["spec"]["template"]["spec"]["containers"]
        return c

    def node_config(self, role: str) -> dict:
        return yaml.safe_load(self.get("ConfigMap", f"{RELEASE}-dicom-{role}")["data"]["dicom_node.yaml"])


@pytest.fixture(scope="module")
def renders() -> dict[str, Render]:
    out = {}
    for name, values in VALUES.items():
        result = template(values)
        assert result.returncode == 0, f"helm template ({name}) failed:\n{result.stderr}"
        out[name] = Render(result.stdout)
    return out


def arg_after(args: list[str], flag: str) -> str:
    assert flag in args, f"{flag} missing from {args}"
    return args[args.index(flag) + 1]


# ---- lint and schema validation ----------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VALUES))
def test_lint_strict(name):
    values = VALUES[name]
    result = helm("lint", "--strict", str(CHART), *(["--values", str(values)] if values else []))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_manifest_passes_kubernetes_validate_strict(renders, tmp_path):
    if KUBERNETES_VALIDATE is None:
        pytest.fail("kubernetes-validate is missing from the environment: it is in the dev extra (make setup)")
    files, expected = [], 0
    for name, render in renders.items():
        core = [d for d in render.docs if not d["apiVersion"].startswith(CRD_GROUPS)]
        expected += len(core)
        path = tmp_path / f"{name}.yaml"
        path.write_text(yaml.safe_dump_all(core, sort_keys=False))
        files.append(str(path))
    result = subprocess.run([KUBERNETES_VALIDATE, "--strict", "-k", KUBE_VERSION, *files],
                            capture_output=True, text=True, timeout=60)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    # a kind or apiVersion without a schema is only a WARN there: it must not pass silently here
    assert "WARN" not in out and "ERROR" not in out, out
    assert out.count(" passed for resource ") == expected, out


def test_service_monitor_only_when_enabled_and_selects_the_metrics_ports(renders):
    assert not renders["default"].of_kind("ServiceMonitor")
    assert not renders["minimal"].of_kind("ServiceMonitor")
    prod = renders["production"]
    (sm,) = prod.of_kind("ServiceMonitor")
    assert sm["apiVersion"] == "monitoring.coreos.com/v1"
    assert sm["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert sm["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["metrics"]
    assert all(e["path"] == "/metrics" for e in sm["spec"]["endpoints"])
    selector = sm["spec"]["selector"]["matchLabels"]
    scraped = {s["metadata"]["name"]: {p["name"]: p["port"] for p in s["spec"]["ports"]}
               for s in prod.of_kind("Service") if selector.items() <= s["metadata"]["labels"].items()}
    # Triton's metrics (the HPA's source), the receivers' and the workers' /metrics; not the headless Service
    assert scraped == {f"{RELEASE}-triton": {"http": 8000, "grpc": 8001, "metrics": 8002, "health": 8003},
                       f"{RELEASE}-dicom": {"dicom": 11112, "metrics": 9110},
                       f"{RELEASE}-dicom-worker": {"metrics": 9110}}


# ---- Triton ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("name", list(VALUES))
def test_triton_probes(renders, name):
    c = renders[name].container(f"{RELEASE}-triton")
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"http": 8000, "grpc": 8001, "metrics": 8002, "health": 8003}
    # readiness: the launcher's /health/ready (every model ready, no stub being reloaded), not Triton's own
    assert c["readinessProbe"]["httpGet"] == {"path": "/health/ready", "port": "health"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/v2/health/live", "port": "http"}
    startup = c["startupProbe"]
    assert startup["httpGet"] == {"path": "/health/ready", "port": "health"}
    # Kubernetes must not restart a pod whose models are still loading within the launcher's own timeout
    ready_timeout = float(arg_after(c["args"], "--ready-timeout"))
    assert startup["periodSeconds"] * startup["failureThreshold"] >= ready_timeout >= 300


@pytest.mark.parametrize("name", list(VALUES))
def test_triton_runs_the_launcher_on_the_container_server(renders, name):
    c = renders[name].container(f"{RELEASE}-triton")
    assert c["command"] == ["python", "-m", "serving.serve"]
    args = c["args"]
    assert arg_after(args, "--checkpoint") == ""
    assert arg_after(args, "--address") == "0.0.0.0"
    assert arg_after(args, "--health-address") == "0.0.0.0"
    assert arg_after(args, "--tritonserver") == "/opt/tritonserver/bin/tritonserver"
    assert arg_after(args, "--probe-s") == "5"
    assert arg_after(args, "--health-port") == "8003"


def test_launcher_knows_every_option_the_chart_passes(renders, capsys):
    from serving import serve

    with pytest.raises(SystemExit):
        serve.main(["--help"])
    known = set(re.findall(r"--[a-z][a-z0-9-]*", capsys.readouterr().out))
    for name, render in renders.items():
        passed = {a for a in render.container(f"{RELEASE}-triton")["args"] if a.startswith("--")}
        assert passed <= known, f"{name}: the launcher has no {sorted(passed - known)}"


@pytest.mark.parametrize("name", list(VALUES))
def test_triton_drains_before_it_stops(renders, name):
    spec = renders[name].get("Deployment", f"{RELEASE}-triton")["spec"]["template"]["spec"]
    (c,) = spec["containers"]
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[0] == "sleep" and int(command[1]) >= 5
    # after the sleep: SIGTERM, and the launcher waits up to 30 s for Triton to finish what is in flight
    assert spec["terminationGracePeriodSeconds"] > int(command[1]) + 30
    shm = [v for v in spec["volumes"] if v["name"] == "dshm"]
    assert shm and shm[0]["emptyDir"]["medium"] == "Memory"
    assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]


def test_headless_service_is_what_the_node_calls(renders):
    render = renders["default"]
    svc = render.get("Service", f"{RELEASE}-triton-headless")["spec"]
    assert svc["clusterIP"] == "None" and svc["publishNotReadyAddresses"] is False
    assert [(p["name"], p["port"]) for p in svc["ports"]] == [("grpc", 8001)]
    selector = render.get("Deployment", f"{RELEASE}-triton")["spec"]["selector"]["matchLabels"]
    assert svc["selector"] == selector
    for role in ("receiver", "worker"):
        assert render.node_config(role)["triton_url"] == \
            f"dns:///{RELEASE}-triton-headless.{NAMESPACE}.svc.cluster.local:8001"


def test_model_repository_s3_in_production_pvc_in_minimal(renders):
    prod = renders["production"]
    c = prod.container(f"{RELEASE}-triton")
    assert arg_after(c["args"], "--model-repository") == "s3://duplus-models/ngc/2026-12-01"
    assert c["envFrom"] == [{"secretRef": {"name": "duplus-model-store"}}]
    spec = prod.get("Deployment", f"{RELEASE}-triton")["spec"]["template"]["spec"]
    assert not any("persistentVolumeClaim" in v for v in spec["volumes"])

    minimal = renders["minimal"]
    c = minimal.container(f"{RELEASE}-triton")
    assert arg_after(c["args"], "--model-repository") == "/models"
    (mount,) = [m for m in c["volumeMounts"] if m["mountPath"] == "/models"]
    assert mount["readOnly"] is True
    spec = minimal.get("Deployment", f"{RELEASE}-triton")["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if v["name"] == mount["name"]]
    assert volume["persistentVolumeClaim"]["claimName"] == "duplus-models"


def test_gpus_only_where_asked(renders):
    limits = renders["production"].container(f"{RELEASE}-triton")["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == 1
    for name in ("default", "minimal"):
        assert "nvidia.com/gpu" not in renders[name].container(f"{RELEASE}-triton")["resources"].get("limits", {})


# ---- autoscaling ----------------------------------------------------------------------------------------

def test_hpa_on_queue_time_only_when_enabled(renders):
    for name in ("default", "minimal"):
        assert not renders[name].of_kind("HorizontalPodAutoscaler")
        assert renders[name].get("Deployment", f"{RELEASE}-triton")["spec"]["replicas"] == 1
    prod = renders["production"]
    (hpa,) = prod.of_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    spec = hpa["spec"]
    assert spec["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": f"{RELEASE}-triton"}
    assert (spec["minReplicas"], spec["maxReplicas"]) == (2, 8)
    (metric,) = spec["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] == QUEUE_METRIC
    assert metric["pods"]["target"] == {"type": "AverageValue", "averageValue": "500000"}
    # the HPA owns the replica count: an upgrade must not reset it
    assert "replicas" not in prod.get("Deployment", f"{RELEASE}-triton")["spec"]


def test_prometheus_adapter_rule_defines_the_hpa_metric(renders):
    for name in ("default", "minimal"):
        assert not any(d["metadata"]["name"].endswith("prometheus-adapter-rules") for d in renders[name].docs)
    cm = renders["production"].get("ConfigMap", f"{RELEASE}-prometheus-adapter-rules")
    assert cm["metadata"]["namespace"] == "monitoring"
    (rule,) = yaml.safe_load(cm["data"]["config.yaml"])["rules"]
    assert rule["name"]["as"] == QUEUE_METRIC
    assert rule["resources"]["overrides"] == {"namespace": {"resource": "namespace"}, "pod": {"resource": "pod"}}
    query = " ".join(rule["metricsQuery"].split())
    assert re.fullmatch(
        r"avg\(delta\(nv_inference_queue_duration_us\{<<\.LabelMatchers>>,model=\"segment_volume\"\}\[30s\]\) "
        r"/ \(1 \+ delta\(nv_inference_request_success\{<<\.LabelMatchers>>,model=\"segment_volume\"\}\[30s\]\)\)\) "
        r"by \(<<\.GroupBy>>\)", query), query


# ---- the DICOM node -------------------------------------------------------------------------------------

def node_fields() -> set[str]:
    from clients.dicom_node import NodeConfig

    return {f.name for f in fields(NodeConfig)}


@pytest.mark.parametrize("name", list(VALUES))
def test_node_roles(renders, name):
    render = renders[name]
    receiver, worker = render.node_config("receiver"), render.node_config("worker")
    assert receiver["workers"] == 0 and receiver["receive"] is True
    assert worker["receive"] is False and worker["workers"] >= 1
    assert receiver["queue_url"] == worker["queue_url"]
    assert urlsplit(receiver["queue_url"]).scheme == "postgresql"
    assert urlsplit(receiver["queue_url"]).password is None
    # the two roles differ in nothing else
    assert {k: v for k, v in receiver.items() if k not in ("receive", "workers")} == \
        {k: v for k, v in worker.items() if k not in ("receive", "workers")}
    assert receiver["host"] == "0.0.0.0"
    unknown = set(receiver) - node_fields() - PENDING_NODE_KEYS
    assert not unknown, f"NodeConfig refuses unknown keys: {sorted(unknown)}"


def test_production_node_settings(renders):
    prod = renders["production"]
    worker = prod.node_config("worker")
    assert worker["workers"] == 4
    assert worker["queue_url"] == "postgresql://duplus@duplus-db.example.internal:5432/duplus?sslmode=require"
    assert prod.get("Deployment", f"{RELEASE}-dicom-receiver")["spec"]["replicas"] == 2
    assert prod.get("Deployment", f"{RELEASE}-dicom-worker")["spec"]["replicas"] == 3
    svc = prod.get("Service", f"{RELEASE}-dicom")["spec"]
    assert svc["type"] == "LoadBalancer"
    assert {"name": "dicom", "port": 11112, "targetPort": "dicom", "protocol": "TCP"} in svc["ports"]


def test_node_config_loads_into_nodeconfig(renders, tmp_path):
    """The worker's configuration (and the receiver's, once NodeConfig has ``receive``) is a valid NodeConfig."""
    from clients.dicom_node import NodeConfig

    pending = PENDING_NODE_KEYS - node_fields()
    roles = ("worker",) if "receive" in pending else ("receiver", "worker")
    for role in roles:
        raw = {k: v for k, v in renders["production"].node_config(role).items() if k not in pending}
        path = tmp_path / f"{role}.yaml"
        path.write_text(yaml.safe_dump(raw))
        cfg = NodeConfig.from_yaml(path)
        assert cfg.port == 11112 and cfg.metrics_port == 9110 and str(cfg.workdir) == "/var/lib/duplus"


@pytest.mark.parametrize("name", list(VALUES))
def test_node_deployments_share_the_spool_and_read_the_password_from_a_secret(renders, name):
    render = renders[name]
    claims = set()
    for role in ("receiver", "worker"):
        deployment = render.get("Deployment", f"{RELEASE}-dicom-{role}")
        spec = deployment["spec"]["template"]["spec"]
        (c,) = spec["containers"]
        assert c["command"] == ["python", "-m", "clients", "dicom-node", "--config", "/etc/duplus/dicom_node.yaml"]
        (config_volume,) = [v for v in spec["volumes"] if v["name"] == "config"]
        assert config_volume["configMap"]["name"] == f"{RELEASE}-dicom-{role}"
        (spool,) = [v for v in spec["volumes"] if v["name"] == "spool"]
        claims.add(spool["persistentVolumeClaim"]["claimName"])
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "spool"]
        assert mount["mountPath"] == render.node_config(role)["workdir"]
        (pg,) = [e for e in c["env"] if e["name"] == "PGPASSWORD"]
        assert "value" not in pg
        assert pg["valueFrom"] == {"secretKeyRef": {"name": "duplus-postgresql", "key": "password"}}
        for probe in ("readinessProbe", "livenessProbe"):
            assert c[probe]["httpGet"] == {"path": "/healthz", "port": "metrics"}
        ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        assert ports == ({"dicom": 11112, "metrics": 9110} if role == "receiver" else {"metrics": 9110})
        assert ports["metrics"] == render.node_config(role)["metrics_port"]
    assert len(claims) == 1, claims
    (pvc,) = render.of_kind("PersistentVolumeClaim")
    assert pvc["metadata"]["name"] in claims
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"


@pytest.mark.parametrize("name", list(VALUES))
def test_no_secret_value_anywhere(renders, name):
    render = renders[name]
    assert not render.of_kind("Secret")
    assert not re.search(r"(?i)password\s*[:=]", render.text), "a password literal in the rendered chart"
    assert not re.search(r"postgres(ql)?://[^@/\s]*:[^@/\s]*@", render.text), "a password inside a URL"


# ---- values the chart refuses ---------------------------------------------------------------------------

SCHEMA = "the specifications of the schema"   # helm's words for values.schema.json refusing a value
ILL_VALUES = [
    # (what, helm arguments, words every one of which the message holds): the chart's own fail messages
    # whole; for the schema, the property's name (helm 3 and 4 word the rest differently)
    ("HPA max < min", ["--set", "triton.autoscaling.enabled=true", "--set", "triton.autoscaling.minReplicas=4",
                       "--set", "triton.autoscaling.maxReplicas=2"],
     ["triton.autoscaling: maxReplicas (2) must be >= minReplicas (4)"]),
    ("no model repository", ["--set", "modelRepository.pvc.claimName="],
     ["modelRepository: set exactly one of pvc.claimName, uri or inImage (got 0)"]),
    ("two model repositories", ["--set", "modelRepository.uri=s3://bucket/models"],
     ["modelRepository: set exactly one of pvc.claimName, uri or inImage (got 2)"]),
    ("a model repository over http", ["--set", "modelRepository.pvc.claimName=",
                                      "--set", "modelRepository.uri=http://bucket/models"], [SCHEMA, "uri"]),
    ("a password in values", ["--set", "postgresql.password=secret"], [SCHEMA, "password"]),
    ("a password in the URI options", ["--set", "postgresql.options=sslmode=require&password=x"],
     [SCHEMA, "options"]),
    ("no password secret", ["--set", "postgresql.existingSecret="], [SCHEMA, "existingSecret"]),
    ("startup shorter than loading", ["--set", "triton.readyTimeoutS=1200"],
     ["periodSeconds x failureThreshold = 660 s is shorter than triton.readyTimeoutS = 1200 s"]),
    ("grace shorter than drain", ["--set", "triton.terminationGracePeriodSeconds=40"],
     ["terminationGracePeriodSeconds (40) must exceed preStopSleepS + 30 (45)"]),
    ("workers in the node config", ["--set", "dicomNode.config.workers=3"],
     ["dicomNode.config.workers is written by the chart"]),
    ("a worker pod without workers", ["--set", "dicomNode.worker.workers=0"], [SCHEMA, "workers"]),
    ("an empty list of Triton urls", ["--set-json", "dicomNode.tritonUrl=[]"], [SCHEMA, "tritonUrl"]),
    ("a misspelt section", ["--set", "trition.gpus=1"], [SCHEMA, "trition"]),
]


@pytest.mark.parametrize("what,args,words", ILL_VALUES, ids=[c[0] for c in ILL_VALUES])
def test_bad_values_are_refused(what, args, words):
    result = template(None, *args)
    assert result.returncode != 0, f"{what}: rendered anyway"
    for word in words:
        assert word in result.stderr, result.stderr


def test_tritonurl_may_be_a_list(tmp_path):
    values = tmp_path / "urls.yaml"
    values.write_text(yaml.safe_dump({"dicomNode": {"tritonUrl": ["triton-a:8001", "triton-b:8001"]}}))
    result = template(values)
    assert result.returncode == 0, result.stderr
    assert Render(result.stdout).node_config("worker")["triton_url"] == ["triton-a:8001", "triton-b:8001"]
