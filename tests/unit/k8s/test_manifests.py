"""The KubeRay manifests: they parse, their Serve config is the one in k8s/serve-config.yaml and validates against
Ray's own Serve schema, its import path builds the app, the RayJob's entrypoint parses with add-task's parser and
targets the served backbone and store, and the Pods are what docs/k8s.md says (resources, auth, probes, volume)."""
from __future__ import annotations

import os
import shlex
from pathlib import Path

import jsonschema
import pytest
import yaml

from tests.unit.k8s.helpers import (
    KUBERAY_SCHEMAS, MANIFESTS, RAYJOB, RAYSERVICE, REPO, SERVE_CONFIG, crd_schema, load, ray_containers, rayjob,
    rayservice, render, serve_config_v2,
)


# ----------------------------------------------------------------------------- parsing and the one source
@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_every_manifest_parses(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    assert docs, f"{path.name} is empty"
    for doc in docs:
        assert isinstance(doc, dict)
        if path != SERVE_CONFIG:
            assert {"apiVersion", "kind", "metadata"} <= set(doc), path.name


def test_manifest_set_is_the_documented_one():
    assert {p.name for p in MANIFESTS} == {
        "serve-config.yaml", "rayservice.yaml", "rayjob-add-task.yaml", "storage.yaml", "secrets.template.yaml"}


def test_serve_config_v2_is_serve_config_yaml_verbatim():
    assert rayservice()["spec"]["serveConfigV2"] == SERVE_CONFIG.read_text()
    assert render().problems() == []  # `python k8s/render.py --check` passes


def test_render_embeds_a_changed_serve_config_and_check_notices(tmp_path, monkeypatch):
    r = render()
    changed = SERVE_CONFIG.read_text().replace("max_batch_size: 16", "max_batch_size: 32")
    text = r.embed_serve_config(RAYSERVICE.read_text(), changed)
    assert yaml.safe_load(text)["spec"]["serveConfigV2"] == changed
    assert r.embed_serve_config(text, SERVE_CONFIG.read_text()) == RAYSERVICE.read_text()  # and back, byte for byte
    stale = tmp_path / "rayservice.yaml"
    stale.write_text(text)
    monkeypatch.setattr(r, "RAYSERVICE", stale)
    assert any("serveConfigV2 differs" in p for p in r.problems())
    assert r.main(["--check"]) == 1 and stale.read_text() == text  # --check changes nothing
    assert r.main([]) == 0 and stale.read_text() == RAYSERVICE.read_text()  # rendering repairs it


# ----------------------------------------------------------------------------- the Serve config
def _strict(model, data: dict, where: str) -> None:
    """Ray's Serve schema ignores unknown keys; a typo there would silently do nothing, so refuse them here."""
    unknown = set(data) - set(model.model_fields)
    assert not unknown, f"{where}: keys {sorted(unknown)} are not fields of Ray's {model.__name__}"


def test_serve_config_v2_validates_against_rays_serve_schema():
    from ray.serve.schema import DeploymentSchema, ServeApplicationSchema, ServeDeploySchema

    config = serve_config_v2()
    parsed = ServeDeploySchema.model_validate(config)
    _strict(ServeDeploySchema, config, "serveConfigV2")
    for app in config["applications"]:
        _strict(ServeApplicationSchema, app, f"application {app['name']}")
        for deployment in app.get("deployments", []):
            _strict(DeploymentSchema, deployment, f"deployment {deployment['name']}")
    assert [a.name for a in parsed.applications] == ["keepclip"]
    assert parsed.http_options.port == 8000 and parsed.http_options.host == "0.0.0.0"


def test_import_path_imports_and_builds_the_app_from_the_config_args():
    from ray._common.utils import import_attr

    from service.settings import RUNTIME_KNOBS, ServiceSettings

    [app] = serve_config_v2()["applications"]
    builder = import_attr(app["import_path"])
    unknown = set(app["args"]) - set(ServiceSettings.model_fields)
    assert not unknown, f"args {sorted(unknown)} are not ServiceSettings fields (they would be ignored)"
    built = builder(app["args"])  # ServiceSettings validation of the args; binds, loads no model
    settings = built._bound_deployment.init_args[0]
    assert (settings.model, settings.store, settings.device) == (app["args"]["model"], app["args"]["store"], "cuda")
    [deployment] = app["deployments"]
    assert deployment["name"] == built._bound_deployment.name  # a config for a deployment the app lacks fails to deploy
    assert set(deployment["user_config"]) <= set(RUNTIME_KNOBS)  # reconfigure() refuses anything else


def test_same_application_as_service_serve_config():
    """k8s/serve-config.yaml and service/serve_config.yaml describe the same application; only where it runs differs."""
    local = yaml.safe_load((REPO / "service" / "serve_config.yaml").read_text())
    cluster = serve_config_v2()
    [a], [b] = local["applications"], cluster["applications"]
    assert (a["name"], a["route_prefix"], a["import_path"]) == (b["name"], b["route_prefix"], b["import_path"])
    assert [d["name"] for d in a["deployments"]] == [d["name"] for d in b["deployments"]]
    assert set(a["deployments"][0]["user_config"]) == set(b["deployments"][0]["user_config"])
    assert local["http_options"]["port"] == cluster["http_options"]["port"] == 8000


def test_replicas_ask_for_a_gpu_and_the_head_offers_none():
    [app] = serve_config_v2()["applications"]
    [deployment] = app["deployments"]
    assert deployment["ray_actor_options"]["num_gpus"] == 1
    cluster = rayservice()["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]
    assert head["rayStartParams"]["num-cpus"] == "0" and head["rayStartParams"]["num-gpus"] == "0"
    assert "nvidia.com/gpu" not in str(head["template"]["spec"]["containers"][0]["resources"])
    [gpu] = cluster["workerGroupSpecs"]
    worker = gpu["template"]["spec"]["containers"][0]
    assert worker["resources"]["limits"]["nvidia.com/gpu"] == 1 == worker["resources"]["requests"]["nvidia.com/gpu"]
    assert int(worker["resources"]["limits"]["cpu"]) >= deployment["ray_actor_options"]["num_cpus"]
    assert gpu["minReplicas"] >= deployment["num_replicas"]  # room for the replicas without waiting on the autoscaler


# ----------------------------------------------------------------------------- the RayJob
def test_rayjob_entrypoint_parses_with_the_add_task_parser():
    from training.add_task import build_parser

    job = rayjob()
    argv = shlex.split(job["spec"]["entrypoint"])
    assert argv[:3] == ["python", "-m", "training.add_task"]
    args = build_parser().parse_args(argv[3:])
    assert args.name == job["metadata"]["labels"]["keepclip.io/task"]
    assert args.workers == job["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] >= 1
    assert args.device == "cuda" and args.no_progress
    assert args.data.startswith("/mnt/keepclip/") and args.checkpoint_dir.startswith("/mnt/keepclip/")


def test_rayjob_publishes_to_the_served_store_with_the_served_backbone():
    from training.add_task import build_parser

    served = serve_config_v2()["applications"][0]["args"]
    args = build_parser().parse_args(shlex.split(rayjob()["spec"]["entrypoint"])[3:])
    assert (args.store, args.model, args.pretrained) == (served["store"], served["model"], served["pretrained"])


def test_rayjob_is_an_ephemeral_gpu_cluster():
    spec = rayjob()["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and "clusterSelector" not in spec
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"
    [gpu] = cluster["workerGroupSpecs"]
    assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert rayjob()["metadata"]["generateName"]  # one RayJob per run: kubectl create, never a fixed name


def test_render_rayjob_for_a_new_task(capsys):
    from training.add_task import build_parser

    r = render()
    assert r.main(["rayjob", "cifar10", "--data", "/mnt/keepclip/data/cifar10/train.npz", "--epochs", "5",
                   "--workers", "2", "--image", "registry.example.com/keepclip:9.9.9"]) == 0
    job = yaml.safe_load(capsys.readouterr().out)
    args = build_parser().parse_args(shlex.split(job["spec"]["entrypoint"])[3:])
    served = serve_config_v2()["applications"][0]["args"]
    assert (args.name, args.epochs, args.workers, args.store, args.pretrained) == (
        "cifar10", 5, 2, served["store"], served["pretrained"])
    assert job["metadata"]["labels"]["keepclip.io/task"] == "cifar10"
    [gpu] = job["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert gpu["replicas"] == gpu["minReplicas"] == gpu["maxReplicas"] == 2
    assert {c["image"] for c in ray_containers(job)} == {"registry.example.com/keepclip:9.9.9"}
    jsonschema.validate(job, KUBERAY_SCHEMAS["RayJob"])


@pytest.mark.parametrize("argv, message", [
    (["x", "--data", "/d", "--store", "s3://elsewhere"], "--store comes from k8s/serve-config.yaml"),
    (["x", "--data", "/d", "--pretrained=openai"], "--pretrained comes from"),
    (["x", "--data", "/d", "--workers", "0"], "--workers must be >= 1"),
    (["x", "--epochs", "3"], "do not parse"),
])
def test_render_rayjob_refuses(argv, message, capsys):
    assert render().main(["rayjob", *argv]) == 2
    assert message in capsys.readouterr().err


# ----------------------------------------------------------------------------- auth, secrets, probes, storage
def test_ray_token_auth_is_on_in_both_clusters_with_one_secret():
    secrets = {d["metadata"]["name"]: d for d in yaml.safe_load_all((REPO / "k8s" / "secrets.template.yaml").read_text())}
    for cluster in (rayservice()["spec"]["rayClusterConfig"], rayjob()["spec"]["rayClusterSpec"]):
        assert cluster["authOptions"] == {"mode": "token", "secretName": "keepclip-ray-auth"}
        assert int(cluster["rayVersion"].split(".")[1]) >= 52  # token auth needs Ray >= 2.52
    assert "auth_token" in secrets["keepclip-ray-auth"]["stringData"]  # the key KubeRay reads
    assert all(v == "" for s in secrets.values() for v in s["stringData"].values())  # a template holds no token


def test_admin_token_comes_from_a_secret_on_every_serving_container():
    for container in ray_containers(rayservice()):
        [env] = [e for e in container["env"] if e["name"] == "KEEPCLIP_ADMIN_TOKEN"]
        assert env["valueFrom"]["secretKeyRef"] == {"name": "keepclip-admin", "key": "admin-token"}
    assert "admin" not in SERVE_CONFIG.read_text().split("applications:", 1)[1].lower()  # never in the Serve config


def test_probes_readiness_on_the_app_liveness_on_ray():
    cluster = rayservice()["spec"]["rayClusterConfig"]
    head = cluster["headGroupSpec"]["template"]["spec"]["containers"][0]
    worker = cluster["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]
    assert worker["readinessProbe"]["httpGet"] == {"path": "/healthz", "port": 8000}
    for probe in (head["readinessProbe"], head["livenessProbe"], worker["livenessProbe"]):
        # Ray's own health endpoints (public under token auth), never Serve's port: a replica that is still
        # loading must neither hold the head back (KubeRay deploys Serve once the head is ready) nor kill a Pod
        assert probe["httpGet"]["port"] in (8265, 52365)
        assert probe["httpGet"]["path"] in ("/api/gcs_healthz", "/api/healthz", "/api/local_raylet_healthz")


def test_every_pod_mounts_the_volume_the_config_paths_live_on():
    served = serve_config_v2()["applications"][0]["args"]
    assert served["store"].startswith("/mnt/keepclip/") and served["pretrained"].startswith("/mnt/keepclip/")
    claim = load(REPO / "k8s" / "storage.yaml")
    assert claim["spec"]["accessModes"] == ["ReadWriteMany"]
    for manifest in (rayservice(), rayjob()):
        for pod in render().pod_templates(manifest):
            volumes = {v["name"]: v for v in pod["spec"]["volumes"]}
            assert volumes["keepclip-data"]["persistentVolumeClaim"]["claimName"] == claim["metadata"]["name"]
            for container in pod["spec"]["containers"]:
                assert {"name": "keepclip-data", "mountPath": "/mnt/keepclip"} in container["volumeMounts"]


def test_pods_run_as_non_root_without_privilege_escalation():
    for manifest in (rayservice(), rayjob()):
        for pod in render().pod_templates(manifest):
            assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
            assert pod["spec"]["securityContext"]["runAsUser"] != 0
            for container in pod["spec"]["containers"]:
                assert container["securityContext"]["allowPrivilegeEscalation"] is False


def test_one_image_and_one_ray_version_everywhere():
    """Head, workers and job Pods run one image (the project's version), and KubeRay's rayVersion is the Ray
    that keepclip pins: Ray refuses to join nodes of different versions."""
    import tomllib

    import ray

    version = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
    images = {c["image"] for m in (rayservice(), rayjob()) for c in ray_containers(m)}
    assert len(images) == 1 and images.pop().endswith(f"/keepclip:{version}")
    versions = {rayservice()["spec"]["rayClusterConfig"]["rayVersion"], rayjob()["spec"]["rayClusterSpec"]["rayVersion"]}
    assert versions == {ray.__version__}


# ----------------------------------------------------------------------------- schema validation
@pytest.mark.parametrize("path, kind", [(RAYSERVICE, "RayService"), (RAYJOB, "RayJob")], ids=["RayService", "RayJob"])
def test_kuberay_fields_are_known_and_well_typed(path, kind):
    jsonschema.validate(load(path), KUBERAY_SCHEMAS[kind])


def test_kuberay_field_schema_catches_typos():
    broken = rayservice()
    broken["spec"]["rayClusterConfig"]["headGroupSpec"]["rayStartParams"]["num-cpus"] = 0  # must be a string
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, KUBERAY_SCHEMAS["RayService"])
    broken = rayservice()
    broken["spec"]["serveConfigv2"] = broken["spec"].pop("serveConfigV2")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, KUBERAY_SCHEMAS["RayService"])


try:
    import kubernetes_validate
except ImportError:  # pragma: no cover - it is in the dev extra
    kubernetes_validate = None
needs_kubernetes_validate = pytest.mark.skipif(kubernetes_validate is None, reason="kubernetes-validate (dev extra) is not installed")


def _k8s_validate(doc: dict) -> None:
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


@needs_kubernetes_validate
@pytest.mark.parametrize("path", [REPO / "k8s" / "storage.yaml", REPO / "k8s" / "secrets.template.yaml"], ids=lambda p: p.name)
def test_core_objects_validate_against_the_kubernetes_schema(path):
    for doc in yaml.safe_load_all(path.read_text()):
        _k8s_validate(doc)


@needs_kubernetes_validate
@pytest.mark.parametrize("path", [RAYSERVICE, RAYJOB], ids=lambda p: p.name)
def test_pod_templates_validate_against_the_kubernetes_schema(path):
    """Each head/worker Pod template is a core/v1 PodTemplateSpec: strict validation against Kubernetes' schema
    (kubernetes-validate, Kubernetes 1.3x) catches unknown or misspelt Pod, container, probe and volume fields."""
    for pod in render().pod_templates(load(path)):
        _k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": pod})


@needs_kubernetes_validate
def test_pod_template_validation_catches_typos():
    pod = render().pod_templates(rayservice())[1]
    container = pod["spec"]["containers"][0]
    container["readinesProbe"] = container.pop("readinessProbe")
    with pytest.raises(kubernetes_validate.ValidationError):
        _k8s_validate({"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "check"}, "template": pod})


CRD_DIR = os.environ.get("KUBERAY_CRD_DIR")


@pytest.mark.skipif(not CRD_DIR, reason="the KubeRay CRDs are not installable from a package registry; set "
                    "KUBERAY_CRD_DIR to a directory with ray.io_rayservices.yaml and ray.io_rayjobs.yaml "
                    "(kuberay's ray-operator/config/crd/bases, or the Helm chart's crds/) to validate against them")
@pytest.mark.parametrize("path, crd", [(RAYSERVICE, "ray.io_rayservices.yaml"), (RAYJOB, "ray.io_rayjobs.yaml")],
                         ids=["RayService", "RayJob"])
def test_manifests_validate_against_the_kuberay_crds(path, crd):
    schema = crd_schema(yaml.safe_load((Path(CRD_DIR) / crd).read_text()))
    jsonschema.validate(load(path), schema)


def test_crd_schema_helper_is_strict_like_the_api_server():
    crd = {"spec": {"versions": [{"name": "v1", "schema": {"openAPIV3Schema": {
        "type": "object", "properties": {"metadata": {"type": "object"}, "spec": {"type": "object", "properties": {
            "replicas": {"type": "integer", "format": "int32"},
            "template": {"type": "object", "x-kubernetes-preserve-unknown-fields": True,
                         "properties": {"a": {"type": "string"}}}}}}}}}]}}
    schema = crd_schema(crd)
    jsonschema.validate({"metadata": {"name": "x"}, "spec": {"replicas": 1, "template": {"b": 1}}}, schema)
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({"spec": {"replica": 1}}, schema)
