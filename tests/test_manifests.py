"""The platform's manifests: every overlay renders every tenant, every rendered document
matches its schema (for each supported Istio version), the overlays carry their settings,
GitOps delivers exactly the EKS overlay, and one image release reaches every tenant."""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fixtures.manifests import (
    OVERLAYS,
    ManifestError,
    identity,
    render,
    render_flux,
    tenant_catalog,
    tenant_folders,
)
from fixtures.schemas import ISTIO_VERSIONS, assert_valid, validate

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
CHECK_CATALOG = PLATFORM / "tools" / "check_catalog.py"
RENDERS = OVERLAYS + ("gitops",)


@functools.cache
def rendered(overlay: str) -> tuple[dict[str, Any], ...]:
    """The repository's platform rendered once per overlay for this module."""
    return tuple(render(PLATFORM, overlay))


def copy_platform(tmp_path: Path) -> Path:
    """A throwaway copy of platform/ to mutate; tmp_path is removed by pytest."""
    dest = tmp_path / "platform"
    shutil.copytree(PLATFORM, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def select(docs, kind: str, namespace: str = "*", name: str = "*") -> list[dict[str, Any]]:
    return [
        d
        for d in docs
        if d.get("kind") == kind
        and namespace in ("*", d["metadata"].get("namespace", ""))
        and name in ("*", d["metadata"].get("name"))
    ]


# --- catalog ---------------------------------------------------------------------------


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_overlay_renders_every_tenant_folder(overlay):
    names = [t["name"] for t in tenant_catalog(list(rendered(overlay)))]
    assert names == tenant_folders(PLATFORM), (
        f"overlay {overlay} renders tenants {names}, but platform/tenants/ has {tenant_folders(PLATFORM)}"
    )


def test_catalog_check_finds_nothing_missing():
    proc = subprocess.run([sys.executable, str(CHECK_CATALOG)], capture_output=True, text=True, check=False)
    assert proc.returncode == 0, proc.stderr


def test_catalog_check_reports_a_tenant_folder_no_overlay_lists(tmp_path):
    platform = copy_platform(tmp_path)
    shutil.copytree(platform / "tenants" / "tenanta", platform / "tenants" / "tenantz")
    proc = subprocess.run(
        [sys.executable, str(CHECK_CATALOG), "--platform-dir", str(platform)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 1
    for place in [f"overlay {o}" for o in OVERLAYS] + ["gitops"]:
        assert f"{place}: tenant folder tenants/tenantz is not listed" in proc.stderr, proc.stderr


def test_render_failure_names_the_overlay_and_kubectl_error(tmp_path):
    platform = copy_platform(tmp_path)
    kind = platform / "overlays" / "kind" / "kustomization.yaml"
    kind.write_text(kind.read_text().replace("../../tenants/tenantb", "../../tenants/no-such-tenant"))
    with pytest.raises(ManifestError, match=r"(?s)^kind: .*kubectl kustomize.*no-such-tenant"):
        render(platform, "kind")
    with pytest.raises(ManifestError, match="overlay 'nowhere': no kustomization.yaml"):
        render(platform, "nowhere")


# --- schemas ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Target:
    overlay: str
    istio: str

    def __str__(self) -> str:
        return f"{self.overlay} is valid on Istio {self.istio}"


@pytest.mark.parametrize("target", [Target(o, i) for o in RENDERS for i in ISTIO_VERSIONS], ids=str)
def test_rendered_documents_match_their_schemas(target):
    assert_valid(rendered(target.overlay), overlay=target.overlay, istio_version=target.istio)


@dataclass(frozen=True)
class Breakage:
    """A mutation of one platform file and the schema error it must cause."""

    what: str
    file: str
    pattern: str
    replacement: str
    expected: str

    def __str__(self) -> str:
        return f"{self.what} is caught"


BREAKAGES = [
    Breakage(
        "a misspelled AuthorizationPolicy field",
        "base/authorization-policy.yaml",
        r"\bprincipals:",
        "principal:",
        "AuthorizationPolicy tenanta/tenant-isolation: $.spec.rules[0].from[0].source.principal: unknown field",
    ),
    Breakage(
        "a Canary threshold that is not a number",
        "base/canary.yaml",
        r"\bthreshold: \d+",
        "threshold: five",
        "Canary tenanta/rag-api: $.spec.analysis.threshold: 'five' is not of type 'number'",
    ),
    Breakage(
        "an Istio enum value that does not exist",
        "mesh/gateway/gateway.yaml",
        r"\bmode: SIMPLE\b",
        "mode: SIMPLEX",
        "Gateway istio-system/public-gateway: $.spec.servers[0].tls.mode: 'SIMPLEX' is not one of",
    ),
    Breakage(
        "a misspelled field of a built-in kind",
        "base/rag-api.yaml",
        r"\bserviceAccountName:",
        "serviceAccount_Name:",
        "Deployment tenanta/rag-api: $.spec.template.spec.serviceAccount_Name: unknown field",
    ),
    Breakage(
        "a PodMonitor field outside the hand-written subset",
        "base/pod-monitor.yaml",
        r"\binterval: 15s",
        "scrapeInterval: 15s",
        "PodMonitor tenanta/tenant-sidecars: $.spec.podMetricsEndpoints[0].scrapeInterval: unknown field",
    ),
    Breakage(
        "a PodMonitor port that is not a port name",
        "base/pod-monitor.yaml",
        r"\bport: http-envoy-prom",
        "port: 15090",
        "PodMonitor tenanta/tenant-sidecars: $.spec.podMetricsEndpoints[0].port: 15090 is not of type 'string'",
    ),
    Breakage(
        "an API version the CRD does not have",
        "mesh/peer-authentication.yaml",
        r"apiVersion: security\.istio\.io/v1\b",
        "apiVersion: security.istio.io/v2",
        "PeerAuthentication istio-system/default: $.apiVersion: security.istio.io/v2 is not a version of the CRD",
    ),
    Breakage(
        "a kind with no schema at all",
        "mesh/peer-authentication.yaml",
        r"\Z",
        "---\napiVersion: widgets.example.com/v1\nkind: Widget\nmetadata:\n  name: w\n  namespace: istio-system\n",
        "Widget istio-system/w: $: no schema for Widget (widgets.example.com/v1)",
    ),
]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=str)
def test_schema_validation_catches(tmp_path, breakage):
    platform = copy_platform(tmp_path)
    path = platform / breakage.file
    text, count = re.subn(breakage.pattern, breakage.replacement, path.read_text(), count=1)
    assert count == 1, f"{breakage.file}: nothing matches {breakage.pattern!r}; update this row"
    path.write_text(text)
    errors = [str(e) for e in validate(render(platform, "standalone"), overlay="standalone", istio_version=ISTIO_VERSIONS[-1])]
    expected = f"standalone: {breakage.expected}"
    assert any(e.startswith(expected) for e in errors), f"expected {expected!r}; got:\n" + "\n".join(errors)
    kind = breakage.expected.split()[0]
    assert all(e.startswith(f"standalone: {kind} ") for e in errors), "errors beyond the mutation:\n" + "\n".join(errors)


# --- overlay settings ------------------------------------------------------------------


@dataclass(frozen=True)
class Setting:
    overlay: str
    kind: str
    where: str  # "namespace/name"; "*" for any
    path: tuple[str, ...]
    value: Any

    def __str__(self) -> str:
        shown = "".join(f"[{p}]" if "." in p else f".{p}" for p in self.path)
        return f"{self.overlay}: {self.kind} {self.where} {shown.lstrip('.')} is {self.value!r}"


def at(dotted: str, *more: str) -> tuple[str, ...]:
    return tuple(dotted.split(".")) + more


GATEWAY = "istio-system/istio-ingressgateway"
ANNOTATIONS = at("metadata.annotations")
NLB = "service.beta.kubernetes.io/aws-load-balancer-"
SETTINGS = [
    Setting("standalone", "Canary", "*/rag-api", at("spec.analysis.interval"), "5s"),
    Setting("standalone", "Canary", "*/rag-api", at("spec.analysis.metrics.0.interval"), "10s"),
    Setting("kind", "Canary", "*/rag-api", at("spec.analysis.interval"), "10s"),
    Setting("kind", "Canary", "*/rag-api", at("spec.analysis.metrics.0.interval"), "30s"),
    Setting("kind", "Canary", "*/rag-api", at("spec.analysis.metrics.1.interval"), "30s"),
    Setting("kind", "Service", GATEWAY, at("spec.type"), "NodePort"),
    Setting("kind", "Service", GATEWAY, at("spec.ports.0.port"), 443),
    Setting("kind", "Service", GATEWAY, at("spec.ports.0.nodePort"), 30443),
    Setting("kind", "Deployment", GATEWAY, at("spec.replicas"), 1),
    Setting("kind", "Deployment", "istio-ingress/reverse-proxy", at("spec.replicas"), 1),
    # Flagger owns the canary target's replica count; no manifest may set it.
    Setting("kind", "Deployment", "*/rag-api", at("spec.replicas"), None),
    Setting("eks", "Deployment", "*/rag-api", at("spec.replicas"), None),
    Setting("eks", "Canary", "*/rag-api", at("spec.analysis.interval"), "1m"),
    Setting("eks", "Canary", "*/rag-api", at("spec.analysis.metrics.0.interval"), "1m"),
    Setting("eks", "Canary", "*/rag-api", at("spec.analysis.metrics.1.interval"), "1m"),
    Setting("eks", "Service", GATEWAY, at("spec.type"), "LoadBalancer"),
    Setting("eks", "Service", GATEWAY, ANNOTATIONS + (NLB + "type",), "external"),
    Setting("eks", "Service", GATEWAY, ANNOTATIONS + (NLB + "nlb-target-type",), "ip"),
    Setting("eks", "Service", GATEWAY, ANNOTATIONS + (NLB + "scheme",), "internet-facing"),
    Setting("eks", "Service", GATEWAY, ANNOTATIONS + (NLB + "proxy-protocol",), "*"),
]


def lookup(doc: dict[str, Any], path: tuple[str, ...]) -> Any:
    value: Any = doc
    for part in path:
        if isinstance(value, list):
            value = value[int(part)] if int(part) < len(value) else None
        else:
            value = (value or {}).get(part)
    return value


@pytest.mark.parametrize("setting", SETTINGS, ids=str)
def test_overlay_setting(setting):
    namespace, _, name = setting.where.partition("/")
    docs = select(rendered(setting.overlay), setting.kind, namespace, name or "*")
    assert docs, f"{setting.overlay} renders no {setting.kind} {setting.where}"
    for doc in docs:
        got = lookup(doc, setting.path)
        where = f"{doc['metadata'].get('namespace')}/{doc['metadata']['name']}"
        assert got == setting.value, f"{setting.overlay}: {setting.kind} {where}: {'.'.join(setting.path)} is {got!r}"


# --- GitOps ----------------------------------------------------------------------------


def flux_kustomizations() -> list[dict[str, Any]]:
    return [d for d in rendered("gitops") if d["apiVersion"].startswith("kustomize.toolkit.fluxcd.io/")]


def test_gitops_has_a_flux_kustomization_for_the_mesh_and_each_tenant():
    paths = sorted(k["spec"]["path"] for k in flux_kustomizations())
    expected = sorted(["./platform/mesh"] + [f"./platform/tenants/{t}" for t in tenant_folders(PLATFORM)])
    assert paths == expected


def test_gitops_references_resolve():
    docs = rendered("gitops")
    names = {(d["kind"], d["metadata"]["name"]) for d in docs}
    for doc in docs:
        spec = doc["spec"]
        ref = spec.get("sourceRef") or spec.get("imageRepositoryRef")
        if ref is not None:
            kind = ref.get("kind", "ImageRepository")
            assert (kind, ref["name"]) in names, f"{doc['kind']} {doc['metadata']['name']}: no {kind} {ref['name']}"
        for dep in spec.get("dependsOn", []):
            assert ("Kustomization", dep["name"]) in names, f"{doc['metadata']['name']} depends on missing {dep['name']}"


def test_flux_kustomizations_together_deliver_exactly_the_eks_overlay():
    eks = {identity(d): d for d in rendered("eks")}
    owner: dict[tuple, str] = {}
    for ks in flux_kustomizations():
        name = ks["metadata"]["name"]
        for doc in render_flux(PLATFORM, ks):
            key = identity(doc)
            assert key not in owner, f"{key} is applied by both {owner[key]} and {name}"
            owner[key] = name
            assert key in eks, f"Flux Kustomization {name} applies {key}, which the eks overlay does not render"
            assert doc == eks[key], f"Flux Kustomization {name} renders {key} unlike the eks overlay"
    missing = sorted(set(eks) - set(owner))
    assert not missing, f"the eks overlay renders objects no Flux Kustomization applies: {missing}"


# --- image automation ------------------------------------------------------------------

MARKER_TOKEN = "$imagepolicy"
MARKER = re.compile(r'#\s*\{\s*"\$imagepolicy"\s*:\s*"(?P<policy>[^"]+)"\s*\}\s*$')
IMAGE_LINE = re.compile(r'^(?P<head>\s*(?:-\s+)?image:\s+)(?P<image>\S+?)(?P<tail>\s+#.*)$')


@dataclass(frozen=True)
class Marker:
    file: str  # relative to platform/
    line: int
    policy: str  # "<namespace>:<name>", "" when the marker is malformed
    image: str  # the value of the image field on the marked line, "" when it is not one

    def __str__(self) -> str:
        return f"{self.file}:{self.line} ({self.policy or 'malformed'})"


def markers(platform: Path) -> list[Marker]:
    """Every image-policy marker in any file under `platform` (the update path)."""
    found = []
    for path in sorted(p for p in platform.rglob("*") if p.is_file() and "__pycache__" not in p.parts):
        try:
            text = path.read_text()
        except (UnicodeDecodeError, OSError):
            continue
        for number, line in enumerate(text.splitlines(), start=1):
            if MARKER_TOKEN not in line:
                continue
            marker = MARKER.search(line)
            image = IMAGE_LINE.match(line)
            found.append(
                Marker(
                    file=path.relative_to(platform).as_posix(),
                    line=number,
                    policy=marker["policy"] if marker else "",
                    image=image["image"] if image and marker else "",
                )
            )
    return found


def image_policies() -> dict[str, str]:
    """"flux-system:rag-api" -> the image repository its ImageRepository scans."""
    docs = rendered("gitops")
    repos = {(d["metadata"]["namespace"], d["metadata"]["name"]): d["spec"]["image"] for d in select(docs, "ImageRepository")}
    out = {}
    for policy in select(docs, "ImagePolicy"):
        ns = policy["metadata"]["namespace"]
        ref = policy["spec"]["imageRepositoryRef"]
        out[f"{ns}:{policy['metadata']['name']}"] = repos[(ref.get("namespace", ns), ref["name"])]
    return out


def repository(image: str) -> str:
    return image.rsplit(":", 1)[0] if ":" in image.rsplit("/", 1)[-1] else image


def test_each_image_policy_marks_exactly_one_image_line():
    policies = image_policies()
    assert set(policies) == {"flux-system:rag-api", "flux-system:app-ui"}
    found = markers(PLATFORM)
    for policy, repo in policies.items():
        lines = [m for m in found if m.policy == policy]
        assert len(lines) == 1, f"{policy}: marked lines {[str(m) for m in lines]}; want exactly one"
        assert repository(lines[0].image) == repo, f"{lines[0]} marks {lines[0].image!r}, not an image of {repo}"


def test_no_stray_image_policy_markers():
    policies = image_policies()
    stray = [m for m in markers(PLATFORM) if m.policy not in policies or not m.image]
    assert not stray, f"markers that name no ImagePolicy or are not on an image line: {[str(m) for m in stray]}"
    (automation,) = select(rendered("gitops"), "ImageUpdateAutomation")
    update_path = automation["spec"]["update"]["path"].strip("./")
    assert update_path == "platform", f"the automation updates {update_path!r}, not the platform's files"


def tenant_images(docs, tenant: str, repo: str) -> list[str]:
    return [
        c["image"]
        for d in select(docs, "Deployment", tenant)
        for c in d["spec"]["template"]["spec"]["containers"]
        if repository(c["image"]) == repo
    ]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_tenant_runs_the_marked_images(overlay):
    marked = {m.policy: m.image for m in markers(PLATFORM)}
    docs = rendered(overlay)
    for tenant in tenant_catalog(list(docs)):
        for policy, repo in image_policies().items():
            images = tenant_images(docs, tenant["name"], repo)
            assert images and set(images) == {marked[policy]}, (
                f"{overlay}: tenant {tenant['name']} runs {images} of {repo}, marked line says {marked[policy]}"
            )


def test_one_release_reaches_every_tenant(tmp_path):
    """Do what the Setters strategy does (rewrite the tag on each marked line) in a copy,
    then every tenant of every overlay, and no other object, must run the new tags."""
    platform = copy_platform(tmp_path)
    released = {}
    for marker in markers(platform):
        path = platform / marker.file
        lines = path.read_text().splitlines(keepends=True)
        new_image = f"{repository(marker.image)}:99.1.0"
        lines[marker.line - 1] = IMAGE_LINE.sub(lambda m: m["head"] + new_image + m["tail"], lines[marker.line - 1].rstrip("\n")) + "\n"
        path.write_text("".join(lines))
        released[marker.policy] = new_image
    assert set(released) == set(image_policies())
    for overlay in OVERLAYS:
        docs = render(platform, overlay)
        for policy, repo in image_policies().items():
            everywhere = {
                c["image"]
                for d in select(docs, "Deployment")
                for c in d["spec"]["template"]["spec"]["containers"]
                if repository(c["image"]) == repo
            }
            assert everywhere == {released[policy]}, f"{overlay}: after the release, {repo} runs as {everywhere}"
        for tenant in tenant_catalog(docs):
            for policy, repo in image_policies().items():
                assert tenant_images(docs, tenant["name"], repo), f"{overlay}: tenant {tenant['name']} runs no {repo}"
