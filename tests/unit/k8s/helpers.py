"""Shared by the k8s tests: the manifests, k8s/render.py loaded from its path, and the schemas they are checked with."""
from __future__ import annotations

import copy
import functools
import importlib.util
import sys
from pathlib import Path
from typing import Any

import yaml

from tests.conftest import REPO

K8S = REPO / "k8s"
MANIFESTS = sorted(K8S.glob("*.yaml"))
RAYSERVICE = K8S / "rayservice.yaml"
RAYJOB = K8S / "rayjob-add-task.yaml"
SERVE_CONFIG = K8S / "serve-config.yaml"
DOCKERFILE = K8S / "Dockerfile"


@functools.cache
def render():
    """k8s/render.py as a module (k8s/ is not a package)."""
    spec = importlib.util.spec_from_file_location("keepclip_k8s_render", K8S / "render.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def load(path: Path) -> dict[str, Any]:
    [doc] = list(yaml.safe_load_all(path.read_text()))
    return doc


def rayservice() -> dict[str, Any]:
    return load(RAYSERVICE)


def rayjob() -> dict[str, Any]:
    return load(RAYJOB)


def serve_config_v2() -> dict[str, Any]:
    """The RayService's serveConfigV2, parsed (it is a YAML string inside the manifest)."""
    return yaml.safe_load(rayservice()["spec"]["serveConfigV2"])


def ray_containers(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for pod in render().pod_templates(manifest) for c in pod["spec"]["containers"]]


# ----------------------------------------------------------------------------- KubeRay fields
# The KubeRay CRDs are not in any package registry, so they cannot be installed here (see docs/k8s.md, "What is
# checked"). This is a hand-written, partial JSON schema of the ray.io/v1 fields our manifests use, transcribed from
# the KubeRay v1 API types (RayServiceSpec, RayJobSpec, RayClusterSpec, HeadGroupSpec, WorkerGroupSpec, AuthOptions;
# KubeRay v1.6 API reference): unknown keys, wrong types and wrong enum values fail, like the API server's strict
# field validation would. Pod templates are validated separately against Kubernetes' own schema.
_STR_MAP = {"type": "object", "additionalProperties": {"type": "string"}}
_INT = {"type": "integer"}
_OBJ = {"type": "object"}
_POD_TEMPLATE = {"type": "object", "required": ["spec"]}

_HEAD = {
    "type": "object", "additionalProperties": False, "required": ["template"],
    "properties": {
        "template": _POD_TEMPLATE, "headService": _OBJ, "enableIngress": {"type": "boolean"}, "ingressOptions": _OBJ,
        "resources": _STR_MAP, "labels": _STR_MAP, "rayStartParams": _STR_MAP, "serviceType": {"type": "string"},
    },
}
_WORKER = {
    "type": "object", "additionalProperties": False, "required": ["groupName", "template"],
    "properties": {
        "suspend": {"type": "boolean"}, "groupName": {"type": "string"}, "replicas": _INT, "minReplicas": _INT,
        "maxReplicas": _INT, "idleTimeoutSeconds": _INT, "priority": _INT, "resources": _STR_MAP, "labels": _STR_MAP,
        "rayStartParams": _STR_MAP, "template": _POD_TEMPLATE, "scaleStrategy": _OBJ, "numOfHosts": _INT,
    },
}
_CLUSTER = {
    "type": "object", "additionalProperties": False, "required": ["headGroupSpec"],
    "properties": {
        "upgradeStrategy": {"type": "object", "additionalProperties": False,
                            "properties": {"type": {"enum": ["Recreate", "None"]}}},
        "authOptions": {"type": "object", "additionalProperties": False, "properties": {
            "mode": {"enum": ["disabled", "token"]}, "secretName": {"type": "string"},
            "enableK8sTokenAuth": {"type": "boolean"}}},
        "suspend": {"type": "boolean"}, "managedBy": {"type": "string"},
        "autoscalerOptions": {"type": "object", "additionalProperties": False, "properties": {
            "resources": _OBJ, "image": {"type": "string"}, "imagePullPolicy": {"type": "string"},
            "securityContext": _OBJ, "idleTimeoutSeconds": _INT,
            "upscalingMode": {"enum": ["Default", "Aggressive", "Conservative"]}, "version": {"enum": ["v1", "v2"]},
            "env": {"type": "array"}, "envFrom": {"type": "array"}, "volumeMounts": {"type": "array"},
            "command": {"type": "array"}, "args": {"type": "array"}}},
        "headServiceAnnotations": _STR_MAP, "enableInTreeAutoscaling": {"type": "boolean"},
        "gcsFaultToleranceOptions": _OBJ, "historyServerOptions": _OBJ, "networkPolicy": _OBJ, "tlsOptions": _OBJ,
        "headGroupSpec": _HEAD, "rayVersion": {"type": "string"}, "workerGroupSpecs": {"type": "array", "items": _WORKER},
    },
}
_METADATA = {"type": "object", "anyOf": [{"required": ["name"]}, {"required": ["generateName"]}]}
KUBERAY_SCHEMAS: dict[str, dict[str, Any]] = {
    "RayService": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayService"}, "metadata": _METADATA,
            "spec": {"type": "object", "additionalProperties": False, "required": ["rayClusterConfig"], "properties": {
                "rayClusterDeletionDelaySeconds": {"type": "integer", "minimum": 0},
                "serviceUnhealthySecondThreshold": _INT, "deploymentUnhealthySecondThreshold": _INT,
                "serveService": _OBJ, "gateway": _OBJ, "httpRoute": _OBJ,
                "upgradeStrategy": {"type": "object", "additionalProperties": False, "properties": {
                    "type": {"enum": ["NewCluster", "NewClusterWithIncrementalUpgrade", "None"]},
                    "clusterUpgradeOptions": _OBJ}},
                "serveConfigV2": {"type": "string"}, "rayClusterConfig": _CLUSTER,
                "excludeHeadPodFromServeSvc": {"type": "boolean"},
            }},
        },
    },
    "RayJob": {
        "type": "object", "required": ["apiVersion", "kind", "metadata", "spec"],
        "properties": {
            "apiVersion": {"const": "ray.io/v1"}, "kind": {"const": "RayJob"}, "metadata": _METADATA,
            "spec": {"type": "object", "additionalProperties": False, "properties": {
                "activeDeadlineSeconds": {"type": "integer", "minimum": 1}, "backoffLimit": {"type": "integer", "minimum": 0},
                "rayClusterSpec": _CLUSTER, "submitterPodTemplate": _POD_TEMPLATE, "metadata": _STR_MAP,
                "clusterSelector": _STR_MAP, "submitterConfig": _OBJ, "managedBy": {"type": "string"},
                "deletionStrategy": _OBJ, "entrypoint": {"type": "string"}, "runtimeEnvYAML": {"type": "string"},
                "jobId": {"type": "string"},
                "submissionMode": {"enum": ["K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode"]},
                "entrypointResources": {"type": "string"}, "entrypointNumCpus": {"type": "number"},
                "entrypointNumGpus": {"type": "number"}, "ttlSecondsAfterFinished": {"type": "integer", "minimum": 0},
                "shutdownAfterJobFinishes": {"type": "boolean"}, "suspend": {"type": "boolean"},
            }},
        },
    },
}


# ----------------------------------------------------------------------------- a CRD's own schema
def crd_schema(crd: dict[str, Any], version: str = "v1") -> dict[str, Any]:
    """The openAPIV3Schema of `version` of a CustomResourceDefinition, as a JSON schema that, like the API server's
    strict field validation, rejects unknown fields (objects with `properties` and no preserve-unknown-fields)."""
    [entry] = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = copy.deepcopy(entry["schema"]["openAPIV3Schema"])

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if ("properties" in node and "additionalProperties" not in node
                    and not node.get("x-kubernetes-preserve-unknown-fields")):
                node["additionalProperties"] = False
            for value in node.values():
                close(value)
        elif isinstance(node, list):
            for value in node:
                close(value)

    close(schema)
    # metadata is validated by the API server itself, not by the CRD's schema
    schema.get("properties", {}).get("metadata", {}).pop("additionalProperties", None)
    return schema
