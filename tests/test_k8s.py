"""Kubernetes manifests (deploy/k8s): rendered as kustomize would, validated against the Kubernetes 1.30 schema,
and read for the controls they exist for (non-root, read-only root, probes, drain, "force the quota path").

No kubectl or kustomize binary is needed. `render` is a small kustomize of exactly the features deploy/k8s
uses (resources, namespace, images, JSON6902 patches with a target) and it refuses any other, so a
kustomization cannot silently render differently here than in a cluster. Where kubectl happens to be
installed, one test compares `render` with `kubectl kustomize` on every kustomization.
"""

from __future__ import annotations

import copy
import re
import shutil
import signal
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml

from gateway.config import BackendConfig, Settings, load_settings
from tests.support.procs import Proc, free_port, python_cmd, wait_http
from tests.support.redis_server import RedisServer

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
OVERLAYS = sorted(p.parent.name for p in (K8S / "overlays").glob("*/kustomization.yaml"))
KUSTOMIZATIONS = sorted(str(p.parent.relative_to(K8S)) for p in K8S.rglob("kustomization.yaml"))
SECRET_TEMPLATE = K8S / "secret.template.yaml"
KUBERNETES_VERSION = "1.30.0"
PLACEHOLDER = "CHANGE-ME"

Doc = dict[str, Any]


# --- the renderer ---------------------------------------------------------------------------------------------


class RenderError(Exception):
    """The kustomization uses something this renderer does not implement, or a patch does not apply."""


_KUSTOMIZATION_FIELDS = {"apiVersion", "kind", "resources", "namespace", "images", "patches"}
_CLUSTER_SCOPED = {
    "Namespace",
    "ClusterRole",
    "ClusterRoleBinding",
    "CustomResourceDefinition",
    "PersistentVolume",
    "StorageClass",
    "PriorityClass",
    "IngressClass",
    "RuntimeClass",
    "ValidatingWebhookConfiguration",
    "MutatingWebhookConfiguration",
}


def load_docs(path: Path) -> list[Doc]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def render(directory: Path) -> list[Doc]:
    """What `kustomize build directory` gives, as a list of documents (order aside)."""
    spec = yaml.safe_load((directory / "kustomization.yaml").read_text()) or {}
    unknown = set(spec) - _KUSTOMIZATION_FIELDS
    if unknown:
        raise RenderError(f"{directory}: kustomization fields {sorted(unknown)} are not supported by tests/test_k8s.py")
    if spec.get("kind", "Kustomization") != "Kustomization":
        raise RenderError(f"{directory}: only kind Kustomization is supported")
    docs: list[Doc] = []
    for entry in spec.get("resources", []):
        path = directory / entry
        docs.extend(render(path) if path.is_dir() else load_docs(path))
    seen: set[tuple[str, str, str]] = set()
    for doc in docs:
        ident = (doc["apiVersion"], doc["kind"], doc["metadata"]["name"])
        if ident in seen:
            raise RenderError(f"{directory}: {ident} is defined twice")
        seen.add(ident)
    # kustomize's order: patches, then the namespace, then images.
    for patch in spec.get("patches", []):
        _apply_patch(docs, patch, directory)
    if "namespace" in spec:
        for doc in docs:
            if doc["kind"] not in _CLUSTER_SCOPED:
                doc["metadata"]["namespace"] = spec["namespace"]
    for image in spec.get("images", []):
        _set_image(docs, image)
    return docs


def _apply_patch(docs: list[Doc], patch: dict[str, Any], directory: Path) -> None:
    if set(patch) - {"target", "patch", "path"} or "target" not in patch:
        raise RenderError(f"{directory}: only JSON6902 patches (target plus patch or path) are supported: {patch}")
    target = patch["target"]
    if set(target) - {"group", "version", "kind", "name", "namespace"}:
        raise RenderError(f"{directory}: patch target selectors other than group/version/kind/name/namespace")
    text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
    ops = yaml.safe_load(text)
    if not isinstance(ops, list):
        raise RenderError(f"{directory}: strategic-merge patches are not supported; use JSON6902 operations")
    matched = [doc for doc in docs if _targets(target, doc)]
    if not matched:
        raise RenderError(f"{directory}: patch target {target} matches nothing")
    for doc in matched:
        for op in ops:
            _json_patch(doc, op)


def _targets(target: dict[str, str], doc: Doc) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    have = {
        "group": group,
        "version": version,
        "kind": doc["kind"],
        "name": doc["metadata"]["name"],
        "namespace": doc["metadata"].get("namespace", ""),
    }
    # kustomize treats each field of a target as an anchored regular expression.
    return all(re.fullmatch(pattern, have[field]) is not None for field, pattern in target.items())


def _json_patch(doc: Doc, op: dict[str, Any]) -> None:
    """One RFC 6902 operation (add, remove, replace, test), in place."""
    kind, path = op["op"], op["path"]
    if not path.startswith("/"):
        raise RenderError(f"JSON pointer must start with '/': {path!r}")
    parts = [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]
    parent: Any = doc
    for part in parts[:-1]:
        parent = parent[_index(part, len(parent))] if isinstance(parent, list) else parent[part]
    key = parts[-1]
    if kind == "test":
        current = parent[_index(key, len(parent))] if isinstance(parent, list) else parent[key]
        if current != op["value"]:
            raise RenderError(f"test failed at {path}: {current!r} != {op['value']!r}")
    elif isinstance(parent, list):
        if kind == "add":
            parent.insert(len(parent) if key == "-" else _index(key, len(parent) + 1), copy.deepcopy(op["value"]))
        elif kind == "replace":
            parent[_index(key, len(parent))] = copy.deepcopy(op["value"])
        elif kind == "remove":
            del parent[_index(key, len(parent))]
        else:
            raise RenderError(f"JSON patch op {kind!r} is not supported")
    elif kind == "add":
        parent[key] = copy.deepcopy(op["value"])
    elif kind in ("replace", "remove"):
        if key not in parent:
            raise RenderError(f"{kind} at {path}: no such member")
        if kind == "replace":
            parent[key] = copy.deepcopy(op["value"])
        else:
            del parent[key]
    else:
        raise RenderError(f"JSON patch op {kind!r} is not supported")


def _index(part: str, size: int) -> int:
    if not re.fullmatch(r"0|[1-9][0-9]*", part) or int(part) >= size:
        raise RenderError(f"bad array index {part!r}")
    return int(part)


def _split_image(image: str) -> tuple[str, str]:
    """`registry:5000/name:tag@digest` -> (`registry:5000/name`, `:tag@digest`)."""
    name, at, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon:] + at + digest
    return name, at + digest


def _set_image(docs: list[Doc], image: dict[str, Any]) -> None:
    if set(image) - {"name", "newName", "newTag", "digest"}:
        raise RenderError(f"images: unsupported fields in {image}")
    for doc in docs:
        for container in containers(doc):
            name, suffix = _split_image(container["image"])
            if name != image["name"]:
                continue
            if "digest" in image:
                suffix = "@" + str(image["digest"])
            elif "newTag" in image:
                suffix = ":" + str(image["newTag"])
            container["image"] = str(image.get("newName", name)) + suffix


# --- reading rendered documents -------------------------------------------------------------------------------


def pod_spec(doc: Doc) -> dict[str, Any] | None:
    if doc["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "ReplicaSet", "Job"):
        spec: dict[str, Any] = doc["spec"]["template"]["spec"]
        return spec
    if doc["kind"] == "CronJob":
        spec = doc["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        return spec
    if doc["kind"] == "Pod":
        spec = doc["spec"]
        return spec
    return None


def containers(doc: Doc) -> list[dict[str, Any]]:
    spec = pod_spec(doc)
    if spec is None:
        return []
    return [*spec.get("initContainers", []), *spec["containers"]]


def find(docs: list[Doc], kind: str, name: str) -> Doc:
    found = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """Does a LabelSelector match these labels? (An empty selector matches everything.)"""
    if any(labels.get(k) != v for k, v in selector.get("matchLabels", {}).items()):
        return False
    for expr in selector.get("matchExpressions", []):
        key, operator, values = expr["key"], expr["operator"], expr.get("values", [])
        ok = {
            "In": key in labels and labels[key] in values,
            "NotIn": key not in labels or labels[key] not in values,
            "Exists": key in labels,
            "DoesNotExist": key not in labels,
        }[operator]
        if not ok:
            return False
    return True


def gateway_container(deployment: Doc) -> dict[str, Any]:
    return next(c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "gateway")


def gateway_yaml(docs: list[Doc]) -> str:
    text: str = find(docs, "ConfigMap", "gateway-config")["data"]["gateway.yaml"]
    return text


def backend_ports(backend: BackendConfig) -> list[int]:
    """The ports the gateway connects to for a backend: its URL's, each listed endpoint's, or its DNS pool's."""
    if backend.discovery is not None:
        return [backend.discovery.port]
    urls = [backend.url] if backend.url is not None else list(backend.endpoints)
    return [urlsplit(url).port or (443 if url.startswith("https:") else 80) for url in urls]


def template_secret() -> Doc:
    (doc,) = load_docs(SECRET_TEMPLATE)
    return doc


def container_env(container: dict[str, Any], secret: Doc) -> dict[str, str]:
    """The environment Kubernetes would give the container, with the Secret's values taken from `secret`."""
    secrets: dict[str, str] = secret["stringData"]
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        assert set(source) == {"secretRef"}, f"unexpected envFrom source {source}"
        assert source["secretRef"]["name"] == secret["metadata"]["name"]
        env.update(secrets)
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = var["value"]
        else:
            ref = var["valueFrom"]["secretKeyRef"]
            assert ref["name"] == secret["metadata"]["name"], f"{var['name']}: unknown Secret {ref['name']}"
            assert ref["key"] in secrets, f"{var['name']}: the Secret template has no key {ref['key']}"
            env[var["name"]] = secrets[ref["key"]]
    return env


def policies_selecting(docs: list[Doc], labels: dict[str, str], policy_type: str) -> list[Doc]:
    return [
        d
        for d in docs
        if d["kind"] == "NetworkPolicy"
        and policy_type in d["spec"].get("policyTypes", ["Ingress"])
        and selects(d["spec"]["podSelector"], labels)
    ]


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[Doc]]:
    return {overlay: render(K8S / "overlays" / overlay) for overlay in OVERLAYS}


# --- rendering and schema -------------------------------------------------------------------------------------


def test_layout() -> None:
    assert {"dev", "production"} <= set(OVERLAYS)
    assert "base" in KUSTOMIZATIONS
    assert (K8S / "README.md").is_file()


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_every_kustomization_renders(kustomization: str) -> None:
    docs = render(K8S / kustomization)
    assert docs
    for doc in docs:
        assert doc["apiVersion"] and doc["kind"] and doc["metadata"]["name"]


def test_renderer_refuses_what_it_does_not_implement(tmp_path: Path) -> None:
    (tmp_path / "cm.yaml").write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    (tmp_path / "kustomization.yaml").write_text("resources: [cm.yaml]\ncommonLabels: {a: b}\n")
    with pytest.raises(RenderError, match="commonLabels"):
        render(tmp_path)
    strategic = "resources: [cm.yaml]\npatches:\n  - target: {kind: ConfigMap}\n    patch: 'data: {a: b}'\n"
    (tmp_path / "kustomization.yaml").write_text(strategic)
    with pytest.raises(RenderError, match="strategic-merge"):
        render(tmp_path)
    missing = "resources: [cm.yaml]\npatches:\n  - target: {kind: Secret}\n    patch: '[]'\n"
    (tmp_path / "kustomization.yaml").write_text(missing)
    with pytest.raises(RenderError, match="matches nothing"):
        render(tmp_path)


def _ident(doc: Doc) -> tuple[str, str, str, str]:
    return (doc["apiVersion"], doc["kind"], doc["metadata"].get("namespace", ""), doc["metadata"]["name"])


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_renderer_agrees_with_kubectl_kustomize(kustomization: str) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        pytest.skip("kubectl is not installed: the renderer is checked against it only where it is")
    result = subprocess.run(
        [kubectl, "kustomize", str(K8S / kustomization)], capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stderr
    theirs = sorted((d for d in yaml.safe_load_all(result.stdout) if d), key=_ident)
    ours = sorted(render(K8S / kustomization), key=_ident)
    assert [_ident(d) for d in ours] == [_ident(d) for d in theirs]
    for mine, real in zip(ours, theirs, strict=True):
        assert mine == real, f"{_ident(mine)} renders differently from kubectl kustomize"


# A hand-written subset of the prometheus-operator ServiceMonitor CRD (monitoring.coreos.com/v1), which the
# core schema does not have: the fields used here, with the CRD's own types and patterns, and no others.
_DURATION = r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?(([0-9]+)s)?(([0-9]+)ms)?)$"
_LABEL_SELECTOR = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "matchLabels": {"type": "object", "additionalProperties": {"type": "string"}},
        "matchExpressions": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["key", "operator"],
                "additionalProperties": False,
                "properties": {
                    "key": {"type": "string"},
                    "operator": {"type": "string"},
                    "values": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
}
SERVICE_MONITOR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["apiVersion", "kind", "metadata", "spec"],
    "additionalProperties": False,
    "properties": {
        "apiVersion": {"const": "monitoring.coreos.com/v1"},
        "kind": {"const": "ServiceMonitor"},
        "metadata": {
            "type": "object",
            "required": ["name"],
            "properties": {
                "name": {"type": "string", "pattern": r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"},
                "namespace": {"type": "string"},
                "labels": {"type": "object", "additionalProperties": {"type": "string"}},
                "annotations": {"type": "object", "additionalProperties": {"type": "string"}},
            },
            "additionalProperties": False,
        },
        "spec": {
            "type": "object",
            "required": ["selector", "endpoints"],
            "additionalProperties": False,
            "properties": {
                "selector": _LABEL_SELECTOR,
                "jobLabel": {"type": "string"},
                "namespaceSelector": {
                    "type": "object",
                    "additionalProperties": False,
                    "properties": {"any": {"type": "boolean"}, "matchNames": {"type": "array"}},
                },
                "endpoints": {
                    "type": "array",
                    "minItems": 1,
                    "items": {
                        "type": "object",
                        "additionalProperties": False,
                        "properties": {
                            "port": {"type": "string"},
                            "path": {"type": "string", "pattern": "^/"},
                            "scheme": {"enum": ["http", "https", "HTTP", "HTTPS"]},
                            "interval": {"type": "string", "pattern": _DURATION},
                            "scrapeTimeout": {"type": "string", "pattern": _DURATION},
                            "honorLabels": {"type": "boolean"},
                        },
                    },
                },
            },
        },
    },
}
# Kinds the core schema does not cover, each with the schema that stands in for it. Any other kind without a
# core schema fails the test.
CUSTOM_SCHEMAS = {("monitoring.coreos.com/v1", "ServiceMonitor"): SERVICE_MONITOR_SCHEMA}


def _validators() -> tuple[Any, Any]:
    """kubernetes_validate and the jsonschema it brings, or a clear failure."""
    try:
        import jsonschema
        import kubernetes_validate
    except ImportError:
        pytest.fail(
            "kubernetes-validate is not installed; it comes with the dev extra "
            "(pip install --require-hashes -r requirements/dev.lock)"
        )
    return kubernetes_validate, jsonschema


def _validate(doc: Doc) -> None:
    kubernetes_validate, jsonschema = _validators()
    custom = CUSTOM_SCHEMAS.get((doc["apiVersion"], doc["kind"]))
    if custom is not None:
        jsonschema.validate(doc, custom, cls=jsonschema.Draft202012Validator)
        # The CRD checks durations by pattern; Prometheus also wants the timeout within the interval.
        for endpoint in doc["spec"]["endpoints"]:
            if "interval" in endpoint and "scrapeTimeout" in endpoint:
                assert _seconds(endpoint["scrapeTimeout"]) <= _seconds(endpoint["interval"])
        return
    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        where = ".".join(str(p) for p in exc.path)
        pytest.fail(f"{doc['kind']}/{doc['metadata']['name']}: {where}: {exc.message}")
    except kubernetes_validate.SchemaNotFoundError as exc:
        pytest.fail(f"{exc.message}: add a schema for it to CUSTOM_SCHEMAS")


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    return sum(float(n) * units[u] for n, u in re.findall(r"(\d+)(ms|s|m|h)", duration))


@pytest.mark.parametrize("kustomization", KUSTOMIZATIONS)
def test_documents_validate_against_kubernetes_1_30(kustomization: str) -> None:
    for doc in render(K8S / kustomization):
        _validate(doc)


def test_servicemonitor_schema_catches_mistakes() -> None:
    jsonschema = _validators()[1]
    (monitor,) = render(K8S / "monitoring")
    bad = copy.deepcopy(monitor)
    bad["spec"]["endpoints"][0]["interval"] = "15 seconds"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(bad, SERVICE_MONITOR_SCHEMA, cls=jsonschema.Draft202012Validator)


# --- the Secret is a template, never a secret -----------------------------------------------------------------


def test_secret_template_holds_only_placeholders(rendered: dict[str, list[Doc]]) -> None:
    secret = template_secret()
    _validate(secret)
    assert secret["kind"] == "Secret" and "data" not in secret
    assert secret["stringData"], "the template lists the keys the Deployment needs"
    for key, value in secret["stringData"].items():
        assert value == PLACEHOLDER, f"{key}: a template holds placeholders only, never a real secret"
    for overlay, docs in rendered.items():
        # Applying an overlay must never create a Secret with placeholder values.
        assert not [d for d in docs if d["kind"] == "Secret"], f"{overlay} renders a Secret"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_secret_the_gateway_needs_is_in_the_template(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    secret = template_secret()
    container = gateway_container(find(docs, "Deployment", "gateway"))
    env = container_env(container, secret)  # asserts every secretKeyRef names a key of the template
    names = set(re.findall(r"(?:key_env|api_key_env):\s*([A-Z0-9_]+)", gateway_yaml(docs)))
    assert names, "the example config declares keys through key_env"
    assert names <= set(env), f"key_env names missing from the Secret template: {names - set(env)}"


# --- the gateway's pod ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_workload_is_hardened(rendered: dict[str, list[Doc]], overlay: str) -> None:
    workloads = [d for d in rendered[overlay] if pod_spec(d) is not None]
    assert workloads
    for doc in workloads:
        where = f"{overlay}: {doc['kind']}/{doc['metadata']['name']}"
        spec = pod_spec(doc)
        assert spec is not None
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, where
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, where
        assert spec["automountServiceAccountToken"] is False, where
        # Service links would put GATEWAY_PORT, GATEWAY_REDIS_PORT, ... in the environment: config overrides.
        assert spec["enableServiceLinks"] is False, where
        assert not spec.get("hostNetwork") and not spec.get("hostPID") and not spec.get("hostIPC"), where
        for c in containers(doc):
            sc = c["securityContext"]
            assert sc["readOnlyRootFilesystem"] is True, f"{where}/{c['name']}"
            assert sc["allowPrivilegeEscalation"] is False, f"{where}/{c['name']}"
            assert sc["capabilities"] == {"drop": ["ALL"]}, f"{where}/{c['name']}"
            assert sc.get("privileged", False) is False, f"{where}/{c['name']}"
            assert sc.get("runAsNonRoot", True) is True, f"{where}/{c['name']}"
            assert c["resources"]["requests"].keys() >= {"cpu", "memory"}, f"{where}/{c['name']}"
            assert c["resources"]["limits"].keys() >= {"cpu", "memory"}, f"{where}/{c['name']}"
            suffix = _split_image(c["image"])[1]
            assert re.fullmatch(r":[\w][\w.-]*|@sha256:[0-9a-f]{64}", suffix), f"{where}: pin {c['image']}"
            assert suffix != ":latest", f"{where}: pin {c['image']}"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_pod(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    deployment = find(docs, "Deployment", "gateway")
    spec = deployment["spec"]
    pod = spec["template"]["spec"]
    assert "replicas" not in spec, "the HorizontalPodAutoscaler owns the replica count"
    assert pod["securityContext"]["runAsUser"] == 10001, "the image's user"
    sa = find(docs, "ServiceAccount", pod["serviceAccountName"])
    assert sa["automountServiceAccountToken"] is False
    c = gateway_container(deployment)
    assert c["securityContext"]["runAsUser"] == 10001
    assert c["args"][:2] == ["--config", "/etc/gateway/gateway.yaml"]
    (port,) = c["ports"]
    assert port == {"name": "http", "containerPort": 8080, "protocol": "TCP"}
    # One worker per pod, sized for about 250 MB RSS and one core.
    assert c["args"][c["args"].index("--workers") + 1] == "1"
    assert c["resources"]["requests"]["memory"] == "256Mi"
    assert _quantity(c["resources"]["limits"]["memory"]) >= _quantity("256Mi")

    assert c["livenessProbe"]["httpGet"] == {"path": "/livez", "port": "http"}
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    startup = c["startupProbe"]
    assert startup["httpGet"]["port"] == "http" and startup["httpGet"]["path"] in ("/livez", "/readyz")
    assert startup["periodSeconds"] * startup["failureThreshold"] >= 30, "room to start"

    annotations = spec["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/scrape"] == "true"
    assert annotations["prometheus.io/path"] == "/metrics"
    assert int(annotations["prometheus.io/port"]) == port["containerPort"]

    spread = pod["topologySpreadConstraints"]
    hostname = [t for t in spread if t["topologyKey"] == "kubernetes.io/hostname"]
    assert hostname and selects(hostname[0]["labelSelector"], spec["template"]["metadata"]["labels"])
    if overlay == "production":
        assert hostname[0]["whenUnsatisfiable"] == "DoNotSchedule"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_drains_before_it_is_killed(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    pod = find(docs, "Deployment", "gateway")["spec"]["template"]["spec"]
    command = gateway_container(find(docs, "Deployment", "gateway"))["lifecycle"]["preStop"]["exec"]["command"]
    # The image has no shell: the pause is python's.
    assert command[:2] == ["python", "-c"], command
    match = re.fullmatch(r"import time; time\.sleep\((\d+(?:\.\d+)?)\)", command[2])
    assert match, command
    pause = float(match.group(1))
    assert pause >= 5, "long enough for kube-proxy and ingress controllers to drop the endpoint"
    settings = yaml.safe_load(gateway_yaml(docs))
    # preStop, then SIGTERM: drain (readyz 503), streams finish within the grace period, billing flushes.
    needed = pause + settings["shutdown_drain_s"] + settings["shutdown_grace_s"] + 10
    assert pod["terminationGracePeriodSeconds"] >= needed


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_filesystem(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    deployment = find(docs, "Deployment", "gateway")
    pod = deployment["spec"]["template"]["spec"]
    volumes = {v["name"]: v for v in pod["volumes"]}
    mounts = {m["mountPath"]: m for m in gateway_container(deployment)["volumeMounts"]}
    config = mounts["/etc/gateway"]
    assert config.get("readOnly") is True
    assert find(docs, "ConfigMap", volumes[config["name"]]["configMap"]["name"])
    writable = [path for path, m in mounts.items() if "emptyDir" in volumes[m["name"]] and not m.get("readOnly")]
    assert set(writable) == {"/var/lib/gateway", "/tmp"}
    # Everything the gateway writes must be on a writable mount: the root filesystem is read-only.
    settings = yaml.safe_load(gateway_yaml(docs))
    paths = [settings["state_path"]] + [s["path"] for s in settings["billing"]["sinks"] if "path" in s]
    for path in paths:
        assert any(path.startswith(w + "/") for w in writable), f"{path} is not on a writable mount"


def _quantity(value: str) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "k": 1e3, "M": 1e6, "G": 1e9, "m": 1e-3}
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([A-Za-z]*)", value)
    assert match, value
    return float(match.group(1)) * units.get(match.group(2), 1)


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_config_loads_with_the_pods_environment(
    rendered: dict[str, list[Doc]], overlay: str, tmp_path: Path
) -> None:
    """The ConfigMap's gateway.yaml, with the environment the Deployment gives, is a valid configuration."""
    docs = rendered[overlay]
    deployment = find(docs, "Deployment", "gateway")
    container = gateway_container(deployment)
    env = container_env(container, template_secret())
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_yaml(docs))
    settings = load_settings(config, env)
    # Several replicas share one state: with no Redis each would enforce its own copy of every quota.
    assert settings.redis_url, f"{overlay}: GATEWAY_REDIS_URL is not set"
    assert settings.listen.port == container["ports"][0]["containerPort"]
    assert settings.listen.host == "0.0.0.0"
    redis_env = next(v for v in container["env"] if v["name"] == "GATEWAY_REDIS_URL")
    if overlay == "production":
        # The external Redis's URL carries its password: from the Secret, and required.
        assert redis_env["valueFrom"]["secretKeyRef"]["key"] == "GATEWAY_REDIS_URL"
        assert not redis_env["valueFrom"]["secretKeyRef"].get("optional", False)
    for backend in settings.backends:
        if backend.kind == "vllm":
            assert set(backend_ports(backend)) == {8000}, "the port the model-server policy opens"


def _loaded(docs: list[Doc], tmp_path: Path) -> Settings:
    """The ConfigMap's gateway.yaml as the dev pod's environment loads it."""
    container = gateway_container(find(docs, "Deployment", "gateway"))
    config = tmp_path / "gateway.yaml"
    config.write_text(gateway_yaml(docs))
    return load_settings(config, container_env(container, template_secret()))


def _selects_pods(service: Doc, labels: dict[str, str]) -> bool:
    selector = service["spec"].get("selector")
    return bool(selector) and selects({"matchLabels": selector}, labels)


def test_dev_model_servers_are_a_pool_the_gateway_discovers(rendered: dict[str, list[Doc]], tmp_path: Path) -> None:
    """Several simulated engines behind a headless Service, and the gateway's backend finding each of them
    through DNS: a ClusterIP Service would resolve to one virtual IP, one engine to the gateway."""
    docs = rendered["dev"]
    settings = _loaded(docs, tmp_path)
    servers = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] != "gateway"]
    assert servers, "the dev overlay runs model servers"
    for deployment in servers:
        labels = deployment["spec"]["template"]["metadata"]["labels"]
        assert labels.get("app.kubernetes.io/component") == "model-server"
        assert deployment["spec"]["replicas"] >= 2, "several engines, so the pool has more than one member"
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        (port,) = [p for p in container["ports"] if p["name"] == "http"]
        (service,) = [s for s in docs if s["kind"] == "Service" and _selects_pods(s, labels)]
        assert service["spec"].get("clusterIP") == "None", "headless: DNS answers every pod, not one virtual IP"
        # The backend that serves from these engines finds them by the Service's name, on the pods' port.
        (backend,) = [
            b for b in settings.backends if b.discovery is not None and b.discovery.dns == service["metadata"]["name"]
        ]
        assert backend.discovery is not None and backend.discovery.port == port["containerPort"]
        assert any(backend.name in m.backends for m in settings.models), "a model is served from the pool"
        # `capacity` is the ceiling per engine; each engine's own metrics set the limit under it.
        assert backend.capacity_mode == "auto"
        args = container["args"]
        if "--max-concurrency" in args:
            assert backend.capacity >= int(args[args.index("--max-concurrency") + 1])


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_service_autoscaler_and_disruption_budget(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    deployment = find(docs, "Deployment", "gateway")
    labels = deployment["spec"]["template"]["metadata"]["labels"]
    assert selects(deployment["spec"]["selector"], labels)

    service = find(docs, "Service", "gateway")
    assert service["spec"]["type"] == "ClusterIP"
    assert selects({"matchLabels": service["spec"]["selector"]}, labels)
    assert service["spec"]["ports"] == [{"name": "http", "port": 80, "targetPort": "http", "protocol": "TCP"}]

    hpa = find(docs, "HorizontalPodAutoscaler", "gateway")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": "gateway"}
    assert 1 <= hpa["spec"]["minReplicas"] <= hpa["spec"]["maxReplicas"]
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Resource" and metric["resource"]["name"] == "cpu"
    assert metric["resource"]["target"]["type"] == "Utilization"
    if overlay == "production":
        assert hpa["spec"]["minReplicas"] >= 3

    pdb = find(docs, "PodDisruptionBudget", "gateway")
    assert pdb["apiVersion"] == "policy/v1"
    assert selects(pdb["spec"]["selector"], labels)
    assert pdb["spec"].get("maxUnavailable") == 1 or pdb["spec"].get("minAvailable") == 1


def test_servicemonitor_scrapes_the_gateway(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["production"]
    monitor = find(docs, "ServiceMonitor", "gateway")
    service = find(docs, "Service", "gateway")
    assert selects(monitor["spec"]["selector"], service["metadata"]["labels"])
    (endpoint,) = monitor["spec"]["endpoints"]
    assert endpoint["port"] in [p["name"] for p in service["spec"]["ports"]]
    assert endpoint["path"] == "/metrics"


# --- NetworkPolicy: force the quota path ----------------------------------------------------------------------


def _model_server_policy(docs: list[Doc]) -> Doc:
    return find(docs, "NetworkPolicy", "model-servers-from-gateway-only")


def _gateway_labels(docs: list[Doc]) -> dict[str, str]:
    labels: dict[str, str] = find(docs, "Deployment", "gateway")["spec"]["template"]["metadata"]["labels"]
    return labels


def assert_admits_only_the_gateway(docs: list[Doc], pod: dict[str, str], port: int, overlay: str) -> None:
    """Only the gateway's pods may open connections to a pod with these labels, and only to `port`.

    Every policy that applies to the pod's ingress counts, not only the one written for it: policies add up,
    so one allow-all policy elsewhere would open the pod to everyone.
    """
    gateway = _gateway_labels(docs)
    policies = policies_selecting(docs, pod, "Ingress")
    assert policies, f"{overlay}: no NetworkPolicy restricts ingress to {pod}"
    for policy in policies:
        where = f"{overlay}: NetworkPolicy/{policy['metadata']['name']}"
        for rule in policy["spec"].get("ingress", []):
            assert rule.get("from"), f"{where}: a rule without `from` admits every source"
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{where}: only pods of this namespace, by label: {peer}"
                assert peer["podSelector"].get("matchLabels"), f"{where}: an empty podSelector admits every pod"
                assert selects(peer["podSelector"], gateway), f"{where}: {peer} is not the gateway"
                assert not selects(peer["podSelector"], pod), f"{where}: {peer} also admits the pods themselves"
            assert rule.get("ports") == [{"protocol": "TCP", "port": port}], f"{where}: port {port} only"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_model_servers_accept_only_the_gateway(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    gateway = _gateway_labels(docs)
    selector = _model_server_policy(docs)["spec"]["podSelector"]
    assert selector.get("matchLabels") or selector.get("matchExpressions"), "must not select every pod"
    assert not selects(selector, gateway), "the gateway is not a model server"
    model_server = dict(selector.get("matchLabels", {}))  # a pod carrying exactly the selector's labels
    assert selects(selector, model_server)
    assert_admits_only_the_gateway(docs, model_server, 8000, overlay)
    # Real model-server pods in the render (the dev simulator) are covered.
    for doc in docs:
        labels = doc["spec"]["template"]["metadata"]["labels"] if pod_spec(doc) is not None else {}
        if labels.get("app.kubernetes.io/component") == "model-server":
            assert selects(selector, labels), f"{doc['metadata']['name']} escapes the model-server policy"


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_gateway_network_policy(rendered: dict[str, list[Doc]], overlay: str) -> None:
    docs = rendered[overlay]
    gateway = _gateway_labels(docs)
    own = find(docs, "NetworkPolicy", "gateway")
    assert selects(own["spec"]["podSelector"], gateway)
    assert set(own["spec"]["policyTypes"]) == {"Ingress", "Egress"}, "default-deny both ways, then allow"
    for rule in own["spec"]["ingress"]:
        assert rule["ports"] == [{"protocol": "TCP", "port": "http"}], "clients reach the gateway's port only"
    egress = [r for p in policies_selecting(docs, gateway, "Egress") for r in p["spec"].get("egress", [])]
    ports = {(p["protocol"], p["port"]) for r in egress for p in r["ports"]}
    assert {("UDP", 53), ("TCP", 53), ("TCP", 8000)} <= ports
    assert all(r.get("to") for r in egress), "no egress rule admits every destination"
    # The gateway's egress to the model servers uses the model-server policy's selector: patch both together.
    model_servers = _model_server_policy(docs)["spec"]["podSelector"]
    to_model_servers = [r for r in own["spec"]["egress"] if {"protocol": "TCP", "port": 8000} in r["ports"]]
    assert [peer["podSelector"] for r in to_model_servers for peer in r["to"]] == [model_servers]
    for rule in egress:
        for peer in rule["to"]:
            cidr = peer.get("ipBlock", {}).get("cidr")
            assert cidr not in ("0.0.0.0/0", "::/0"), "egress to anywhere"


def test_dev_redis(rendered: dict[str, list[Doc]]) -> None:
    docs = rendered["dev"]
    redis = find(docs, "StatefulSet", "gateway-redis")
    assert redis["spec"]["replicas"] == 1
    (container,) = redis["spec"]["template"]["spec"]["containers"]
    assert re.fullmatch(r"redis:7\.\d+\.\d+", container["image"]), "a pinned redis 7 release"
    args = container["args"]
    assert args[args.index("--appendonly") + 1] == "yes"
    assert args[args.index("--maxmemory-policy") + 1] == "noeviction", "tenants and budgets are never evicted"
    (claim,) = redis["spec"]["volumeClaimTemplates"]
    assert {"name": claim["metadata"]["name"], "mountPath": "/data"} in container["volumeMounts"]
    labels = redis["spec"]["template"]["metadata"]["labels"]

    service = find(docs, "Service", "gateway-redis")
    assert selects({"matchLabels": service["spec"]["selector"]}, labels)
    env = gateway_container(find(docs, "Deployment", "gateway"))["env"]
    url = next(v for v in env if v["name"] == "GATEWAY_REDIS_URL")
    assert url["value"] == f"redis://{service['metadata']['name']}:{service['spec']['ports'][0]['port']}/0"

    gateway = _gateway_labels(docs)
    assert_admits_only_the_gateway(docs, labels, 6379, "dev")
    # ... and the gateway may reach it.
    egress = [r for p in policies_selecting(docs, gateway, "Egress") for r in p["spec"].get("egress", [])]
    assert any(
        any(selects(peer.get("podSelector", {"matchLabels": {"": "-"}}), labels) for peer in r["to"])
        and {"protocol": "TCP", "port": 6379} in r["ports"]
        for r in egress
    )
    assert not [d for d in rendered["production"] if d["kind"] == "StatefulSet"], "production: external Redis"


# --- the container contract, with a real gateway process ------------------------------------------------------


@pytest.fixture
def redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.kill()


def _status(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=2) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return exc.code


def test_the_gateway_runs_as_the_dev_pod_would(
    rendered: dict[str, list[Doc]], tmp_path: Path, redis: RedisServer
) -> None:
    """Start `gateway serve` with the pod's args, config and environment (mount paths moved under tmp_path,
    Redis on loopback), then check its probes answer and SIGTERM drains it within the grace period."""
    docs = rendered["dev"]
    deployment = find(docs, "Deployment", "gateway")
    container = gateway_container(deployment)
    mounts = {m["mountPath"]: tmp_path / m["name"] for m in container["volumeMounts"]}
    for directory in mounts.values():
        directory.mkdir()

    mount_path = re.compile(r"(?<![\w/.-])(" + "|".join(map(re.escape, sorted(mounts, key=len, reverse=True))) + ")/")

    def relocate(text: str) -> str:
        return mount_path.sub(lambda m: f"{mounts[m.group(1)]}/", text)

    (mounts["/etc/gateway"] / "gateway.yaml").write_text(relocate(gateway_yaml(docs)))
    secret = template_secret()
    secret["stringData"] = {k: "sk-gw-" + "x" * 43 for k in secret["stringData"]}
    env = container_env(container, secret)
    port = free_port()
    env.update(GATEWAY_REDIS_URL=redis.url, GATEWAY_LISTEN__HOST="127.0.0.1", GATEWAY_LISTEN__PORT=str(port))
    proc = Proc([*python_cmd("serve"), *map(relocate, container["args"])], tmp_path / "gateway.log", env)
    proc.start()
    try:
        started = time.monotonic()
        startup = container["startupProbe"]
        budget = startup["periodSeconds"] * startup["failureThreshold"]
        wait_http(f"http://127.0.0.1:{port}{startup['httpGet']['path']}", timeout=budget, proc=proc.popen)
        wait_http(f"http://127.0.0.1:{port}{container['readinessProbe']['httpGet']['path']}", timeout=budget)
        assert time.monotonic() - started < budget
        assert _status(f"http://127.0.0.1:{port}{container['livenessProbe']['httpGet']['path']}") == 200
        assert (mounts["/var/lib/gateway"]).exists()

        proc.signal(signal.SIGTERM)
        # Draining: still listening, but no longer ready (the endpoint is already gone after preStop).
        deadline = time.monotonic() + 1
        while _status(f"http://127.0.0.1:{port}{container['readinessProbe']['httpGet']['path']}") != 503:
            assert time.monotonic() < deadline, "readyz still 200 after SIGTERM"
            time.sleep(0.02)
        grace = deployment["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
        assert proc.popen is not None
        assert proc.popen.wait(grace) == 0, proc.output()
    finally:
        proc.kill()
