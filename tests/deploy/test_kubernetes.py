"""Kubernetes manifests: core resources validated with kubernetes-validate (the Kubernetes
OpenAPI schemas, strict: unknown fields are errors), and consistency with reclaimd's config.

kubernetes-validate has no schema for the Prometheus Operator's ServiceMonitor and PrometheusRule,
and no PyPI package ships their CRD schemas without side effects, so those two are checked against
the fields of the monitoring.coreos.com/v1 API they use; the PrometheusRule's rules themselves
are promtool-checked (they equal deploy/prometheus/rules, see test_prometheus_rules.py).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from daemon.config import Settings
from tests.deploy.support import DEPLOY, load_yaml, load_yaml_all, setting_env_names

KUBE = DEPLOY / "kubernetes"
CORE_KINDS = {"Namespace", "DaemonSet", "Service"}
KUBERNETES_VERSION = "1.30.0"  # the oldest release the manifests promise to work on


def resources() -> list[tuple[Path, dict[str, Any]]]:
    return [
        (path, doc)
        for path in sorted(KUBE.glob("*.yaml"))
        if path.name != "kustomization.yaml"
        for doc in load_yaml_all(path)
    ]


def by_kind(kind: str) -> dict[str, Any]:
    (doc,) = [doc for _, doc in resources() if doc["kind"] == kind]
    return doc


def container() -> dict[str, Any]:
    (c,) = by_kind("DaemonSet")["spec"]["template"]["spec"]["containers"]
    return c  # type: ignore[no-any-return]


def test_kustomization_lists_every_manifest() -> None:
    listed = load_yaml(KUBE / "kustomization.yaml")["resources"]
    on_disk = sorted(p.name for p in KUBE.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == on_disk


def test_kinds() -> None:
    kinds = sorted(doc["kind"] for _, doc in resources())
    assert kinds == ["DaemonSet", "Namespace", "PrometheusRule", "Service", "ServiceMonitor"]


@pytest.mark.parametrize(
    "doc",
    [doc for _, doc in resources() if doc["kind"] in CORE_KINDS],
    ids=lambda doc: doc["kind"],
)
def test_core_resources_validate_strictly(doc: dict[str, Any]) -> None:
    kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_strict_validation_rejects_an_unknown_field() -> None:
    daemonset = by_kind("DaemonSet")
    daemonset["spec"]["template"]["spec"]["hostPIDs"] = True
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)


def test_daemonset_environment_is_reclaimds_configuration() -> None:
    env = {e["name"]: e for e in container()["env"]}
    assert set(env) <= setting_env_names(), set(env) - setting_env_names()
    values = {
        name.removeprefix("RECLAIMD_").lower(): e["value"]
        for name, e in env.items()
        if "value" in e
    }
    settings = Settings(**values)  # raises on any value reclaimd would refuse
    (port,) = container()["ports"]
    assert port["containerPort"] == settings.listen_port
    mounted = {m["mountPath"] for m in container()["volumeMounts"]}
    assert settings.socket_glob is not None and settings.listen_socket is not None
    assert str(Path(settings.socket_glob).parent) in mounted
    assert str(settings.listen_socket.parent) in mounted
    assert str(settings.journal.parent) in mounted
    token = env["RECLAIMD_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert token["optional"] is True, "without the Secret, balloon changes must stay refused"


def test_daemonset_asks_for_exactly_one_capability() -> None:
    pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    security = container()["securityContext"]
    assert security["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE"]}
    assert security["privileged"] is False
    assert security["allowPrivilegeEscalation"] is False
    assert security["readOnlyRootFilesystem"] is True
    assert pod["hostPID"] is True  # to see QEMU processes on the node
    assert not pod.get("hostNetwork") and not pod.get("hostIPC")
    assert pod["automountServiceAccountToken"] is False
    assert pod["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for volume in pod["volumes"]:
        if "hostPath" in volume:
            assert volume["hostPath"]["path"] in {"/run/qemu", "/run/reclaimd", "/var/lib/reclaimd"}


def test_probes_use_healthz_and_readyz_on_the_metrics_port() -> None:
    assert container()["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "metrics"}
    assert container()["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "metrics"}


def test_service_selects_the_pods_and_names_the_port() -> None:
    service = by_kind("Service")
    pod_labels = by_kind("DaemonSet")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    (port,) = service["spec"]["ports"]
    assert port["targetPort"] == container()["ports"][0]["name"] == port["name"]
    assert service["spec"]["clusterIP"] == "None"


# Fields of monitoring.coreos.com/v1 used here, from the Prometheus Operator's API reference.
SERVICE_MONITOR_SPEC = {"selector", "endpoints", "namespaceSelector", "jobLabel", "targetLabels"}
ENDPOINT = {"port", "path", "interval", "scrapeTimeout", "relabelings", "scheme", "honorLabels"}
RELABEL = {"sourceLabels", "targetLabel", "action", "regex", "replacement", "separator"}
DURATION = re.compile(
    r"^(0|(([0-9]+)y)?(([0-9]+)w)?(([0-9]+)d)?(([0-9]+)h)?(([0-9]+)m)?"
    r"(([0-9]+)s)?(([0-9]+)ms)?)$"
)


def test_service_monitor() -> None:
    monitor = by_kind("ServiceMonitor")
    service = by_kind("Service")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(monitor["spec"]) <= SERVICE_MONITOR_SPEC
    assert (
        monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    )
    assert monitor["metadata"]["namespace"] == service["metadata"]["namespace"]
    (endpoint,) = monitor["spec"]["endpoints"]
    assert set(endpoint) <= ENDPOINT
    assert endpoint["port"] == service["spec"]["ports"][0]["name"]
    assert endpoint["path"] == "/metrics"
    for duration in ("interval", "scrapeTimeout"):
        assert DURATION.match(endpoint[duration]), endpoint[duration]
    for relabel in endpoint["relabelings"]:
        assert set(relabel) <= RELABEL
    # The dashboards' "instance" is the QEMU host: the node, not the pod address.
    assert {
        "sourceLabels": ["__meta_kubernetes_pod_node_name"],
        "targetLabel": "instance",
        "action": "replace",
    } in endpoint["relabelings"]


def test_prometheus_rule_shape() -> None:
    rule = by_kind("PrometheusRule")
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert set(rule["spec"]) == {"groups"}
    for group in rule["spec"]["groups"]:
        assert set(group) <= {"name", "interval", "rules"}
        for r in group["rules"]:
            assert set(r) <= {"record", "alert", "expr", "for", "labels", "annotations"}
            assert ("record" in r) != ("alert" in r)
            if "for" in r:
                assert DURATION.match(r["for"]), r["for"]


def test_every_resource_lives_in_the_namespace() -> None:
    namespace = by_kind("Namespace")["metadata"]["name"]
    for path, doc in resources():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace, path.name
    assert load_yaml(KUBE / "kustomization.yaml")["namespace"] == namespace


# kustomize's strategic merge keys for the lists the libvirt overlay patches.
MERGE_KEYS = {"containers": "name", "env": "name", "volumeMounts": "mountPath", "volumes": "name"}


def strategic_merge(base: Any, patch: Any, key: str | None = None) -> Any:
    """``patch`` merged into ``base`` as kustomize merges a DaemonSet patch: maps by key, the
    lists above by their merge key, ``$patch: delete`` removing the item it names (which must
    exist: a delete of nothing would hide a renamed base item)."""
    if isinstance(base, dict) and isinstance(patch, dict):
        merged = dict(base)
        for k, v in patch.items():
            merged[k] = strategic_merge(base[k], v, k) if k in base else v
        return merged
    if isinstance(base, list) and key in MERGE_KEYS:
        by = MERGE_KEYS[key]
        merged_list = list(base)
        added = []
        for item in patch:
            at = [i for i, b in enumerate(merged_list) if b[by] == item[by]]
            if item.get("$patch") == "delete":
                assert at, f"the patch deletes {key} {item[by]!r}, which the base does not have"
                del merged_list[at[0]]
            elif at:
                merged_list[at[0]] = strategic_merge(merged_list[at[0]], item)
            else:
                added.append(item)
        return added + merged_list
    return patch


def libvirt_daemonset() -> dict[str, Any]:
    overlay = DEPLOY / "kubernetes-libvirt"
    kustomization = load_yaml(overlay / "kustomization.yaml")
    assert kustomization["resources"] == ["../kubernetes"]
    (patch_file,) = [p["path"] for p in kustomization["patches"]]
    patch = load_yaml(overlay / patch_file)
    base = by_kind("DaemonSet")
    assert patch["kind"] == base["kind"]
    assert all(base["metadata"][k] == v for k, v in patch["metadata"].items())
    # The overlay touches the container's environment and mounts and the pod's volumes, and
    # nothing else: no capability, privilege or host namespace beyond the base's.
    extra = patch["spec"]["template"]["spec"]
    assert set(extra) == {"containers", "volumes"}
    (more,) = extra["containers"]
    assert set(more) == {"name", "env", "volumeMounts"}
    merged: dict[str, Any] = strategic_merge(base, patch)
    return merged


def test_the_libvirt_overlay_has_the_libvirt_socket_read_only_and_no_qmp_paths() -> None:
    daemonset = libvirt_daemonset()
    kubernetes_validate.validate(daemonset, KUBERNETES_VERSION, strict=True)
    pod = daemonset["spec"]["template"]["spec"]
    (c,) = pod["containers"]
    env = {e["name"]: e for e in c["env"]}
    assert set(env) <= setting_env_names(), set(env) - setting_env_names()
    assert env["RECLAIMD_LIBVIRT"]["value"] == "qemu:///system"
    # Neither QMP attach mode: no socket glob, no listen socket, and their paths are gone.
    assert "RECLAIMD_SOCKET_GLOB" not in env and "RECLAIMD_LISTEN_SOCKET" not in env
    settings = Settings(
        **{n[len("RECLAIMD_") :].lower(): e["value"] for n, e in env.items() if "value" in e}
    )
    assert settings.socket_glob is None and settings.listen_socket is None
    mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
    assert set(mounts) == {"/run/libvirt", str(settings.journal.parent), "/tmp"}
    assert mounts["/run/libvirt"] == {
        "name": "libvirt-run",
        "mountPath": "/run/libvirt",
        "readOnly": True,
    }
    host_paths = {v["name"]: v["hostPath"]["path"] for v in pod["volumes"] if "hostPath" in v}
    assert host_paths == {"libvirt-run": "/run/libvirt", "journal": "/var/lib/reclaimd"}
    # Written on the host: the journal only.
    writable = {mounts[p]["name"] for p in mounts if not mounts[p].get("readOnly")}
    assert writable & set(host_paths) == {"journal"}
    # The base's rights, no more: the one capability for the host view, and hostPID.
    assert c["securityContext"] == container()["securityContext"]
    assert c["securityContext"]["capabilities"] == {"drop": ["ALL"], "add": ["SYS_PTRACE"]}
    base_pod = by_kind("DaemonSet")["spec"]["template"]["spec"]
    assert {k: v for k, v in pod.items() if k not in ("containers", "volumes")} == {
        k: v for k, v in base_pod.items() if k not in ("containers", "volumes")
    }
    assert "/run/qemu" not in str(daemonset) and "/run/reclaimd" not in str(daemonset)


def test_the_libvirt_overlay_builds_with_kustomize_as_merged_here(
    not_run: Callable[[str], None],
) -> None:
    kubectl = shutil.which("kubectl")
    if kubectl is None:
        not_run("kubectl not found: the libvirt overlay was merged by this test only")
        return
    built = subprocess.run(
        [kubectl, "kustomize", str(DEPLOY / "kubernetes-libvirt")],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    (daemonset,) = [d for d in yaml.safe_load_all(built) if d["kind"] == "DaemonSet"]
    ours = libvirt_daemonset()
    ours["spec"]["template"]["spec"]["containers"][0]["image"] = "ignored"
    daemonset["spec"]["template"]["spec"]["containers"][0]["image"] = "ignored"
    assert daemonset == ours
