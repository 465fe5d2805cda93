"""The deployment kit in deploy/, checked statically: no network, no cluster, no containers.

The KubeRay manifests must carry the same Serve application as deploy/serve.yaml and only use
deployments, subcommands and flags that exist; the dashboard only metrics the service exports.
"""
from __future__ import annotations

import argparse
import json
import re
import shlex
import subprocess
from pathlib import Path

import pytest
import yaml

from conftest import ctrl_c_enabled
from medhash.training.trainer import LOCAL_RAY_ENV

ROOT = Path(__file__).resolve().parents[1]
DEPLOY = ROOT / "deploy"
PROMTOOL = Path("/usr/bin/promtool")
DEPLOYMENTS = {"ImageEncoder", "TextEncoder", "Hasher", "Index", "Ingress"}


def _documents(path: Path) -> list:
    return [doc for doc in yaml.safe_load_all(path.read_text(encoding="utf-8")) if doc is not None]


def _one(path: Path, kind: str) -> dict:
    docs = [d for d in _documents(path) if d.get("kind") == kind]
    assert len(docs) == 1, f"{path.name}: expected one {kind}, found {len(docs)}"
    return docs[0]


def _serve_yaml() -> dict:
    return yaml.safe_load((DEPLOY / "serve.yaml").read_text(encoding="utf-8"))


def _rayservice() -> dict:
    return _one(DEPLOY / "kuberay-rayservice.yaml", "RayService")


def _rayjob() -> dict:
    return _one(DEPLOY / "kuberay-rayjob.yaml", "RayJob")


def _groups(cluster_spec: dict) -> list[tuple[str, dict]]:
    """(group name, pod spec) of the head and every worker group."""
    groups = [("head", cluster_spec["headGroupSpec"]["template"]["spec"])]
    groups += [(g["groupName"], g["template"]["spec"]) for g in cluster_spec.get("workerGroupSpecs", [])]
    return groups


def _check_pod_volumes(name: str, pod: dict) -> dict[str, str]:
    """Every mount names a declared volume; returns mount path -> claim name."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    mounts = {}
    for container in pod["containers"]:
        for mount in container.get("volumeMounts", []):
            assert mount["name"] in volumes, f"{name}: mount {mount['name']!r} has no volume"
            claim = volumes[mount["name"]].get("persistentVolumeClaim", {}).get("claimName")
            mounts[mount["mountPath"]] = claim
    return mounts


def _env(container: dict) -> dict[str, dict]:
    return {e["name"]: e for e in container.get("env", [])}


# ---------------------------------------------------------------------------------------------
# every file parses


@pytest.mark.parametrize("path", sorted(DEPLOY.glob("*.y*ml")), ids=lambda p: p.name)
def test_every_yaml_in_deploy_parses(path):
    docs = _documents(path)
    assert docs and all(isinstance(d, dict) for d in docs)


def test_the_kit_is_complete():
    names = {p.name for p in DEPLOY.iterdir()}
    assert {"serve.yaml", "kuberay-rayservice.yaml", "kuberay-rayjob.yaml", "milvus-compose.yml",
            "prometheus.yml", "grafana-dashboard.json"} <= names


# ---------------------------------------------------------------------------------------------
# RayService


def test_rayservice_runs_the_same_serve_application_as_serve_yaml():
    service = _rayservice()
    assert service["apiVersion"] == "ray.io/v1"
    embedded = yaml.safe_load(service["spec"]["serveConfigV2"])
    reference = _serve_yaml()
    assert embedded["applications"][0]["import_path"] == "medhash.serving.app:app_builder"
    # the whole Serve config: import path, args, every deployment's autoscaling and resources
    assert embedded == reference


def test_serve_configs_use_real_deployments_and_valid_options():
    from ray.serve import Deployment
    from ray.serve.config import AutoscalingConfig
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    import medhash.serving.app

    in_app = {d.name for d in vars(medhash.serving.app).values() if isinstance(d, Deployment)}
    assert in_app == DEPLOYMENTS
    for config in (_serve_yaml(), yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])):
        ServeDeploySchema.model_validate(config)
        assert set(config) <= set(ServeDeploySchema.model_fields)
        (application,) = config["applications"]
        assert set(application) <= set(ServeApplicationSchema.model_fields)
        assert set(application["args"]) <= {"run", "milvus_uri", "config"}  # what app_builder accepts
        names = [d["name"] for d in application["deployments"]]
        assert len(names) == len(set(names)) and set(names) <= in_app
        for deployment in application["deployments"]:
            assert set(deployment) <= set(DeploymentSchema.model_fields), deployment["name"]
            if "autoscaling_config" in deployment:
                assert set(deployment["autoscaling_config"]) <= set(AutoscalingConfig.model_fields)
                AutoscalingConfig(**deployment["autoscaling_config"])


def test_rayservice_cluster_has_cpu_and_autoscaled_gpu_workers():
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    assert cluster["enableInTreeAutoscaling"] is True
    workers = cluster["workerGroupSpecs"]
    gpu = [g for g in workers if any(c["resources"]["limits"].get("nvidia.com/gpu") == 1 for c in g["template"]["spec"]["containers"])]
    cpu = [g for g in workers if g not in gpu]
    assert gpu and cpu
    for group in workers:
        assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    assert any(g["maxReplicas"] > g["minReplicas"] for g in gpu)  # room to autoscale
    # the encoders ask for GPUs: one GPU pod must hold the minimum replicas' share
    serve = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])["applications"][0]["deployments"]
    gpu_floor = sum(d["ray_actor_options"].get("num_gpus", 0) * d["autoscaling_config"]["min_replicas"]
                    for d in serve if "autoscaling_config" in d)
    assert gpu_floor <= sum(g["minReplicas"] for g in gpu)


def test_rayservice_pods_have_token_models_and_metrics():
    cluster = _rayservice()["spec"]["rayClusterConfig"]
    run = yaml.safe_load(_rayservice()["spec"]["serveConfigV2"])["applications"][0]["args"]["run"]
    head = cluster["headGroupSpec"]
    groups = [head, *cluster["workerGroupSpecs"]]
    for name, pod in _groups(cluster):
        mounts = _check_pod_volumes(name, pod)
        assert mounts.get("/models"), f"{name}: no PVC at /models"
        assert run.startswith("/models/")
        for container in pod["containers"]:
            assert container["image"] == "ghcr.io/medhash/medhash:latest"
            token = _env(container)["MEDHASH_API_TOKEN"]
            assert "secretKeyRef" in token["valueFrom"] and "value" not in token
            assert 8080 in {p["containerPort"] for p in container["ports"]}, f"{name}: metrics port"
    for group in groups:
        assert str(group["rayStartParams"]["metrics-export-port"]) == "8080"
        annotations = group["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/scrape"] == "true" and annotations["prometheus.io/port"] == "8080"
    http_port = _serve_yaml()["http_options"]["port"]
    assert http_port in {p["containerPort"] for p in head["template"]["spec"]["containers"][0]["ports"]}


# ---------------------------------------------------------------------------------------------
# RayJob


def _entrypoint_commands() -> list[list[str]]:
    entrypoint = _rayjob()["spec"]["entrypoint"]
    return [shlex.split(part) for part in entrypoint.split("&&")]


def _subcommand_options(parser: argparse.ArgumentParser, command: str) -> set[str]:
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return set(subparsers.choices[command]._option_string_actions)


def test_rayjob_entrypoint_is_accepted_by_the_real_cli():
    from medhash.services.cli import build_parser

    parser = build_parser()
    parsed = {}
    for argv in _entrypoint_commands():
        assert argv[0] == "medhash", argv
        try:
            args = parser.parse_args(argv[1:])
        except SystemExit as exc:
            pytest.fail(f"`{shlex.join(argv)}` is refused by the medhash parser (exit {exc.code})")
        # spelled out in full: argparse would also take an abbreviation such as --worker
        flags = {token.split("=")[0] for token in argv[2:] if token.startswith("-")}
        assert flags <= _subcommand_options(parser, args.command), f"medhash {args.command}: {sorted(flags)}"
        parsed[args.command] = args
    assert set(parsed) == {"train", "eval"}
    train, evaluate = parsed["train"], parsed["eval"]
    assert evaluate.run == train.out  # eval reads the run train wrote
    assert str(train.out).startswith("/models/") and str(evaluate.out).startswith("/models/")


def test_rayjob_training_config_loads_and_matches_the_gpu_workers():
    from medhash.services.cli import build_parser
    from medhash.services.config import load_config

    train = build_parser().parse_args(_entrypoint_commands()[0][1:])
    assert (ROOT / train.config).is_file()
    cfg = load_config(ROOT / train.config, {"train.workers": train.workers})
    assert cfg.train.use_gpu in (None, True)  # None: GPUs when the cluster has them
    spec = _rayjob()["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    (gpu,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert gpu["replicas"] == gpu["minReplicas"] == 2
    gpus = sum(c["resources"]["limits"].get("nvidia.com/gpu", 0) for c in gpu["template"]["spec"]["containers"])
    assert gpus == 1
    assert cfg.train.workers == gpu["replicas"] * gpus  # one Ray Train worker per GPU


def test_rayjob_pods_have_data_models_and_environment():
    cluster = _rayjob()["spec"]["rayClusterSpec"]
    for name, pod in _groups(cluster):
        mounts = _check_pod_volumes(name, pod)
        assert mounts.get("/data") and mounts.get("/models"), f"{name}: PVCs at /data and /models"
        for container in pod["containers"]:
            env = _env(container)
            assert env["MEDHASH_DATA"]["value"] == "/data"
            assert env["MEDHASH_CACHE"]["value"] == "/models/cache"
            for variable, value in LOCAL_RAY_ENV.items():  # Ray Train polls its workers as on a local cluster
                assert env[variable]["value"] == value, f"{name}: {variable}"


# ---------------------------------------------------------------------------------------------
# Milvus, Prometheus


def test_compose_has_milvus_on_19530_with_healthcheck_and_named_volumes():
    compose = yaml.safe_load((DEPLOY / "milvus-compose.yml").read_text(encoding="utf-8"))
    services = compose["services"]
    assert {"etcd", "minio", "standalone"} <= set(services)
    milvus = services["standalone"]
    assert milvus["image"].startswith("milvusdb/milvus:v2.5.")
    assert "19530:19530" in [str(p) for p in milvus["ports"]]
    assert "9091/healthz" in " ".join(milvus["healthcheck"]["test"])
    assert set(milvus["depends_on"]) == {"etcd", "minio"}
    env = milvus["environment"]
    assert env["ETCD_ENDPOINTS"].split(":")[0] == "etcd" and env["MINIO_ADDRESS"].split(":")[0] == "minio"
    declared = set(compose["volumes"])
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            assert source in declared, f"{name}: volume {source!r} is not a declared named volume"


def test_prometheus_scrapes_medhash_metrics_and_ray_discovery():
    config = yaml.safe_load((DEPLOY / "prometheus.yml").read_text(encoding="utf-8"))
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    medhash = jobs["medhash"]
    assert medhash.get("metrics_path", "/metrics") == "/metrics"
    assert medhash["static_configs"][0]["targets"] == ["localhost:8000"]
    assert medhash.get("scrape_interval", config["global"]["scrape_interval"]) == "15s"
    files = [f for sd in jobs["ray"]["file_sd_configs"] for f in sd["files"]]
    assert files == ["/tmp/ray/prom_metrics_service_discovery.json"]
    from ray._private.ray_constants import PROMETHEUS_SERVICE_DISCOVERY_FILE

    assert Path(files[0]).name == PROMETHEUS_SERVICE_DISCOVERY_FILE


def test_ingress_serves_metrics_at_the_scraped_path():
    import medhash.serving.app

    paths = set(medhash.serving.app.api.openapi()["paths"])  # the routes of the Ingress class
    assert "/search/text" in paths
    jobs = {j["job_name"]: j for j in yaml.safe_load((DEPLOY / "prometheus.yml").read_text())["scrape_configs"]}
    assert jobs["medhash"].get("metrics_path", "/metrics") in paths


def _promtool(*args: str) -> subprocess.CompletedProcess:
    if not PROMTOOL.is_file():
        pytest.skip(f"{PROMTOOL} not installed (Debian package `prometheus`)")
    return subprocess.run([str(PROMTOOL), *args], capture_output=True, text=True, timeout=60)


def test_promtool_accepts_the_prometheus_config():
    result = _promtool("check", "config", str(DEPLOY / "prometheus.yml"))
    assert result.returncode == 0, result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------
# Grafana


def _dashboard() -> dict:
    return json.loads((DEPLOY / "grafana-dashboard.json").read_text(encoding="utf-8"))


def _exprs() -> list[str]:
    return [t["expr"] for p in _dashboard()["panels"] for t in p["targets"]]


def _defined_series() -> dict[str, set[str]]:
    """Series name -> label names of every metric in medhash.serving.prometheus.REGISTRY, as Prometheus sees them."""
    import medhash.serving.prometheus
    from prometheus_client.metrics import MetricWrapperBase

    labels_of = {
        m.describe()[0].name: set(m._labelnames)
        for m in vars(medhash.serving.prometheus).values() if isinstance(m, MetricWrapperBase)
    }
    suffixes = {"counter": ("_total",), "histogram": ("_bucket", "_sum", "_count"), "gauge": ("",)}
    series = {}
    for family in medhash.serving.prometheus.REGISTRY.collect():
        for suffix in suffixes[family.type]:
            series[family.name + suffix] = labels_of[family.name] | ({"le"} if suffix == "_bucket" else set())
    return series


def test_dashboard_shape():
    dashboard = _dashboard()
    assert dashboard["schemaVersion"] == 39
    (variable,) = [v for v in dashboard["templating"]["list"] if v["name"] == "DS_PROMETHEUS"]
    assert variable["type"] == "datasource" and variable["query"] == "prometheus"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["title"] and panel["targets"]
        assert {"x", "y", "w", "h"} <= set(panel["gridPos"]) and panel["gridPos"]["x"] + panel["gridPos"]["w"] <= 24
        assert panel["datasource"]["uid"] == "${DS_PROMETHEUS}"
        for target in panel["targets"]:
            assert target["expr"].strip()
            assert target["datasource"]["uid"] == "${DS_PROMETHEUS}"


def test_dashboard_uses_only_exported_medhash_metrics_and_labels():
    series = _defined_series()
    assert "medhash_requests_total" in series and "medhash_request_latency_seconds_bucket" in series
    used = set()
    for expr in _exprs():
        names = set(re.findall(r"\b(medhash_[A-Za-z0-9_]+)", expr))
        unknown = names - set(series)
        assert not unknown, f"{expr}: not exported by serving/metrics.py: {sorted(unknown)}"
        used |= names
        if names:
            labels = set().union(*(series[n] for n in names))
            for group in re.findall(r"\bby\s*\(([^)]*)\)", expr):
                grouped = {label.strip() for label in group.split(",") if label.strip()}
                assert grouped <= labels, f"{expr}: no label(s) {sorted(grouped - labels)}"
    # and every metric family appears on some panel
    families = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in series}
    shown = {re.sub(r"_(total|bucket|sum|count)$", "", n) for n in used}
    assert families == shown, f"not on the dashboard: {sorted(families - shown)}"


def test_dashboard_ray_metrics_exist_in_the_installed_ray():
    import ray

    ray_root = Path(ray.__file__).parent
    names = {n for e in _exprs() for n in re.findall(r"\b(ray_[A-Za-z0-9_]+)", e)}
    assert names, "the dashboard shows no Ray Serve metric"
    sources = "\n".join(p.read_text(encoding="utf-8", errors="ignore") for p in (ray_root / "serve" / "_private").glob("*.py"))
    for name in names:  # Ray defines them without the exported "ray_" prefix
        assert f'"{name.removeprefix("ray_")}"' in sources, f"{name} is not defined by ray {ray.__version__}"


def test_promtool_parses_every_dashboard_query(tmp_path):
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"medhash:dashboard:{i}", "expr": expr} for i, expr in enumerate(_exprs())
    ]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = _promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_docs_describe_the_kit():
    text = (ROOT / "docs" / "deploy.md").read_text(encoding="utf-8")
    for name in ("serve.yaml", "kuberay-rayservice.yaml", "kuberay-rayjob.yaml", "milvus-compose.yml",
                 "prometheus.yml", "grafana-dashboard.json"):
        assert name in text, f"docs/deploy.md does not mention {name}"


@pytest.mark.parametrize("name,kind", [("kuberay-rayservice.yaml", "RayService"), ("kuberay-rayjob.yaml", "RayJob")])
def test_ray_ports_other_than_the_api_and_metrics_are_closed_to_other_pods(name, kind):
    """A NetworkPolicy selects every pod of the cluster; only 8000 (API) and 8080 (metrics) are open to all."""
    docs = _documents(DEPLOY / name)
    spec = _one(DEPLOY / name, kind)["spec"]
    cluster = spec.get("rayClusterConfig") or spec["rayClusterSpec"]
    (policy,) = [d for d in docs if d["kind"] == "NetworkPolicy"]
    selector = policy["spec"]["podSelector"]["matchLabels"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster.get("workerGroupSpecs", [])]
    for template in templates:
        assert selector.items() <= template["metadata"]["labels"].items()
    assert policy["spec"]["policyTypes"] == ["Ingress"]
    open_to_all, restricted = set(), set()
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule.get("ports", [])} or {"every"}
        (open_to_all if "from" not in rule else restricted).update(ports)
    assert open_to_all <= {8000, 8080} and 8265 not in open_to_all and "every" not in open_to_all
    for rule in policy["spec"]["ingress"]:
        for peer in rule.get("from", []):
            assert peer["podSelector"]["matchLabels"] in (selector, {"app.kubernetes.io/name": "kuberay-operator"})
    if kind == "RayJob":
        assert spec["submissionMode"] == "HTTPMode"


def test_the_shipped_serve_yaml_without_a_token_is_refused(tmp_path):
    """`serve run deploy/serve.yaml` as docs/deploy.md says, with no token: the application is refused when it
    is built (Serve reports DEPLOY_FAILED), so nothing answers on port 8000. (A blank token takes the same check:
    test_serving_config.py.)"""
    import os
    import signal
    import sys
    import time

    import requests

    serve_cli = Path(sys.executable).with_name("serve")
    env = {k: v for k, v in os.environ.items() if k not in ("MEDHASH_API_TOKEN", "RAY_ADDRESS")}
    log = tmp_path / "serve-run.log"
    with log.open("w") as out:
        process = subprocess.Popen([str(serve_cli), "run", str(DEPLOY / "serve.yaml")], env=env, cwd=tmp_path,
                                   stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
                                   preexec_fn=ctrl_c_enabled)
    try:
        deadline = time.monotonic() + 240
        while "MEDHASH_API_TOKEN is empty or blank" not in log.read_text(errors="replace"):
            assert process.poll() is None or process.returncode != 0, log.read_text()[-2000:]
            assert time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(1)
        try:
            answer = requests.post("http://127.0.0.1:8000/search/text", json={"text": "chest"}, timeout=10)
            assert answer.status_code != 200
        except requests.ConnectionError:
            pass
    finally:
        os.killpg(process.pid, signal.SIGINT)  # serve run shuts its local Ray down on Ctrl-C
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(10)
