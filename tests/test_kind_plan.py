"""The kind dry run (`make test-local DRY_RUN=1`): the exact commands and manifests of a
real run, in order, each an argument list of a pinned tool, every manifest valid."""

from __future__ import annotations

import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from fixtures.cluster import versions
from fixtures.cluster.commands import Background, Command, Poll, Recorder
from fixtures.cluster.__main__ import main
from fixtures.cluster.plan import kind_plan
from fixtures.cluster.tools import resolve
from fixtures.kind import aws, cluster, stack
from fixtures.kind.backend import KindPlatform
from fixtures.kind.identity import moto_jwks
from fixtures.manifests import load_documents, tenant_catalog, tenant_folders
from fixtures.platform import Tenant
from fixtures.schemas import ISTIO_VERSIONS, validate

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"
SHARED_CRDS = REPO.parent / "shared" / "crds"


@pytest.fixture(scope="module")
def steps():
    return kind_plan(PLATFORM)


def commands(steps) -> list[Command]:
    out = []
    for s in steps:
        cmd = s.command if isinstance(s, (Poll, Background)) else s
        if cmd.argv[0] != "#":
            out.append(cmd)
    return out


def sections(steps) -> list[str]:
    return [s.what for s in steps if isinstance(s, Command) and s.argv[0] == "#"]


def index_of(cmds: list[Command], *tokens: str) -> int:
    for i, c in enumerate(cmds):
        if all(t in c.argv for t in tokens):
            return i
    raise AssertionError(f"no command with {tokens}")


def test_phases_come_in_order(steps):
    names = sections(steps)
    order = ["render the platform", "tools", "kind cluster tenant-mesh", "images from platform/apps",
             f"Istio {versions.ISTIO}", f"cert-manager {versions.CERT_MANAGER}", "Prometheus Operator",
             f"Flagger {versions.FLAGGER}", "identity provider", "platform/overlays/kind", "wait for the platform",
             "suite run namespace", "during the tests", "on a failed test", "teardown"]
    positions = [next(i for i, n in enumerate(names) if n.startswith(o)) for o in order]
    assert positions == sorted(positions), names


def test_cluster_is_created_before_use_and_deleted_last(steps):
    cmds = commands(steps)
    create = index_of(cmds, "create", "cluster")
    assert create < index_of(cmds, "load", "docker-image") < index_of(cmds, "install", "-y")
    assert cmds[-1].argv[1:] == ("delete", "cluster", "--name", "tenant-mesh")
    # the run's namespaces go first, by their run label only
    assert "platform.example.com/suite-run=dry-run" in cmds[-2].argv


def test_keep_leaves_the_cluster():
    rec = Recorder()
    plat = KindPlatform(PLATFORM, keep=True, runner=rec, tools=resolve(dry_run=True), run_id="k")
    plat.present = True
    plat.close()
    assert not [c for c in rec.commands() if c.argv[1:3] == ("delete", "cluster")]
    plat.keep = False
    plat.tear_down()
    assert rec.commands()[-1].argv[1:] == ("delete", "cluster", "--name", "tenant-mesh")


ALLOWED_TOOLS = {"kubectl", f"kind-v{versions.KIND}", "istioctl", "docker", Path(sys.executable).name}


def test_every_command_is_an_argument_list_of_a_pinned_tool(steps):
    for cmd in commands(steps):
        assert isinstance(cmd.argv, tuple) and all(isinstance(a, str) for a in cmd.argv)
        assert cmd.tool in ALLOWED_TOOLS, cmd.argv
        assert cmd.argv[0] not in ("sh", "bash", "/bin/sh", "/bin/bash")
        if cmd.tool == "istioctl":
            assert f"istio-{versions.ISTIO}" in cmd.argv[0], cmd.argv
        # no shell plumbing smuggled into an argument
        for arg in cmd.argv[1:]:
            if "\n" not in arg:  # an inline script for python in a pod is one argument, not a shell line
                assert not any(op in arg for op in ("|", "&&", ";", "$(", "`")), cmd.argv


def test_versions_are_pinned(steps):
    cmds = commands(steps)
    create = cmds[index_of(cmds, "create", "cluster")]
    assert create.argv[create.argv.index("--image") + 1] == versions.KIND_NODE_IMAGE
    assert "@sha256:" in versions.KIND_NODE_IMAGE
    assert any(f"revision={versions.istio_revision(versions.ISTIO)}" in c.argv for c in cmds)
    applied_files = [c.argv[c.argv.index("-f") + 1] for c in cmds if "-f" in c.argv and c.argv[c.argv.index("-f") + 1] != "-"]
    assert any(f"cert-manager-v{versions.CERT_MANAGER}" in f for f in applied_files)
    assert any(f"prometheus-operator-v{versions.PROMETHEUS_OPERATOR}" in f for f in applied_files)
    assert any(f"flagger-{versions.FLAGGER}" in a for c in cmds for a in c.argv)
    for c in cmds:
        assert not any(a.endswith(":latest") for a in c.argv), c.argv
    prometheus = [d for c in cmds if c.stdin and not c.stdin_label
                  for d in load_documents(c.stdin) if d["kind"] == "Prometheus"]
    assert prometheus[0]["spec"]["version"] == f"v{versions.PROMETHEUS}"


def test_pins_match_the_vendored_schemas():
    assert versions.ISTIO_RELEASES == ISTIO_VERSIONS
    assert (PLATFORM / "schemas" / "crds" / "flagger" / f"flagger-v{versions.FLAGGER}-crd.yaml").is_file()
    for a in versions.artifacts("linux", "amd64"):
        assert a.version in a.url and a.url.startswith("https://")
    assert {a.name for a in versions.artifacts("darwin", "arm64")} == {a.name for a in versions.artifacts()}


@pytest.fixture(scope="module")
def schema_dir(tmp_path_factory) -> Path:
    """The shared CRDs (../shared/crds, or the vendored copy) plus the hand-written subsets."""
    root = tmp_path_factory.mktemp("schemas")
    (root / "crds").symlink_to(SHARED_CRDS if SHARED_CRDS.is_dir() else PLATFORM / "schemas" / "crds")
    shutil.copytree(PLATFORM / "schemas" / "extra", root / "extra")
    shutil.copy(REPO / "fixtures" / "kind" / "schemas" / "monitoring.coreos.com_subset.yaml", root / "extra")
    return root


@pytest.mark.parametrize("istio", ISTIO_VERSIONS)
def test_every_applied_manifest_is_valid(steps, schema_dir, istio):
    docs = [d for c in commands(steps) if c.stdin is not None and not c.stdin_label
            for d in load_documents(c.stdin)]
    assert len(docs) > 50
    errors = validate(docs, overlay="kind plan", istio_version=istio, schema_dir=schema_dir)
    assert not errors, "\n".join(map(str, errors))


def applied_platform(steps) -> list[dict]:
    return load_documents(next(c for c in commands(steps) if c.what.startswith("apply the platform")).stdin)


def test_tenants_trust_the_emulator_key_inline(steps):
    docs = applied_platform(steps)
    rules = [r for d in docs if d["kind"] == "RequestAuthentication" for r in d["spec"]["jwtRules"]]
    assert rules and all("jwksUri" not in r and r["jwks"] == moto_jwks() for r in rules)
    # only the key source changed: every tenant's issuer is still the one its config names
    issuers = {Tenant.from_config(d).issuer for d in tenant_catalog(docs)}
    assert {r["issuer"] for r in rules} == issuers and len(issuers) == len(tenant_folders(PLATFORM))


def applied(steps, what: str) -> list[dict]:
    """The documents of the apply whose description starts with ``what``."""
    return [d for c in commands(steps) if c.what.startswith(what) and c.stdin and not c.stdin_label
            for d in load_documents(c.stdin)]


def test_prometheus_selects_every_pod_monitor_of_the_platform(steps):
    crds = next(i for i, s in enumerate(steps) if isinstance(s, Poll) and "customresourcedefinitions" in s.command.argv)
    assert "podmonitors.monitoring.coreos.com" in steps[crds].until
    monitoring = next(i for i, s in enumerate(steps) if isinstance(s, Command) and s.argv[0] != "#"
                      and s.what.startswith("Prometheus "))
    assert crds < monitoring, "monitoring.yaml is applied before the PodMonitor CRD is established"
    (prometheus,) = [d for d in applied(steps, "Prometheus ") if d["kind"] == "Prometheus"]
    monitors = [d for d in applied_platform(steps) if d["kind"] == "PodMonitor"]
    assert {m["metadata"]["namespace"] for m in monitors} == set(tenant_folders(PLATFORM))
    assert not [d for d in applied_platform(steps) if d["kind"] == "ServiceMonitor"]
    spec = prometheus["spec"]
    for monitor in monitors:
        labels = monitor["metadata"].get("labels") or {}
        assert all(labels.get(k) == v for k, v in (spec["podMonitorSelector"].get("matchLabels") or {}).items())
        assert not spec["podMonitorSelector"].get("matchExpressions")
        assert spec["podMonitorNamespaceSelector"] == {}, "the tenants' namespaces must be selected"


def _seconds(duration: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    number, unit = re.fullmatch(r"(\d+)(ms|s|m|h)", duration).groups()
    return int(number) * units[unit]


def test_each_canary_metric_window_holds_four_scrapes(steps):
    """rate() over a window needs several samples; with fewer a Canary judges noise or nothing."""
    docs = applied_platform(steps)
    scrape = max(_seconds(e["interval"]) for d in docs if d["kind"] == "PodMonitor"
                 for e in d["spec"]["podMetricsEndpoints"])
    windows = [_seconds(m["interval"]) for d in docs if d["kind"] == "Canary" for m in d["spec"]["analysis"]["metrics"]]
    assert windows and min(windows) >= 4 * scrape, (windows, scrape)


def test_the_load_tester_runs_as_the_identity_the_tenants_admit(steps):
    docs = applied(steps, "Flagger's load tester")
    (sa,) = [d for d in docs if d["kind"] == "ServiceAccount"]
    assert sa["metadata"] == {"name": stack.LOADTESTER_SERVICE_ACCOUNT, "namespace": stack.FLAGGER_NAMESPACE}
    principal = f"cluster.local/ns/{stack.FLAGGER_NAMESPACE}/sa/{stack.LOADTESTER_SERVICE_ACCOUNT}"
    policies = [d for d in applied_platform(steps) if d["kind"] == "AuthorizationPolicy"
                and d["metadata"]["name"] == "tenant-isolation"]
    assert len(policies) == len(tenant_folders(PLATFORM))
    for policy in policies:
        assert any(principal in s["source"].get("principals", [])
                   for r in policy["spec"]["rules"] for s in r.get("from", [])), policy["metadata"]


def test_flagger_without_a_sidecar_reaches_the_load_tester(steps):
    """Flagger runs in istio-system with no sidecar; under the mesh-wide STRICT mTLS its
    plain-HTTP webhook calls are refused unless the load tester's port accepts them."""
    docs = applied(steps, "Flagger's load tester")
    namespace = next(d for d in docs if d["kind"] == "Namespace")
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"
    (peer,) = [d for d in docs if d["kind"] == "PeerAuthentication"]
    assert peer["metadata"]["namespace"] == stack.FLAGGER_NAMESPACE
    assert peer["spec"]["selector"] == {"matchLabels": {"app": stack.LOADTESTER}}
    assert peer["spec"]["portLevelMtls"] == {str(stack.LOADTESTER_PORT): {"mode": "PERMISSIVE"}}
    assert peer["spec"]["mtls"] == {"mode": "STRICT"}


def test_cluster_config_maps_the_overlays_gateway_node_port(steps):
    cfg = cluster.config("x", cluster.gateway_node_port(applied_platform(steps)), 31000)
    mapping = cfg["nodes"][0]["extraPortMappings"][0]
    assert mapping == {"containerPort": 30443, "hostPort": 31000, "listenAddress": "127.0.0.1", "protocol": "TCP"}
    yaml.safe_dump(cfg)  # what kind reads


def test_images_are_built_from_platform_apps_and_the_emulator_dockerfile(steps):
    cmds = commands(steps)
    builds = [c for c in cmds if c.argv[1:2] == ("build",)]
    assert {Path(c.argv[-1]).name for c in builds} == {"rag_api", "app_ui", "standalone"}
    for b in builds:
        dockerfile = Path(b.argv[b.argv.index("--file") + 1]) if "--file" in b.argv else Path(b.argv[-1]) / "Dockerfile"
        assert dockerfile.is_file()
        image = b.argv[b.argv.index("--tag") + 1]
        assert any(c.argv[1:4] == ("load", "docker-image", image) for c in cmds)
    emulator = next(b for b in builds if "--file" in b.argv)
    assert emulator.argv[emulator.argv.index("--file") + 1] == str(aws.DOCKERFILE)
    assert f"MOTO_VERSION={versions.MOTO}" in emulator.argv
    assert f"PYTHON_IMAGE={versions.PYTHON_IMAGE}" in emulator.argv


def test_emulators_run_and_hold_the_tenants_data_before_the_platform_is_applied(steps):
    cmds = commands(steps)
    emulators = next(i for i, c in enumerate(cmds) if c.stdin and "aws-emulators" in c.stdin and "apply" in c.argv)
    forward = next(i for i, c in enumerate(cmds) if "port-forward" in c.argv and "svc/moto" in c.argv)
    provision = index_of(cmds, "-m", "fixtures.kind.aws")
    platform = next(i for i, c in enumerate(cmds) if c.stdin and "kind: Canary" in c.stdin)
    assert index_of(cmds, "load", "docker-image", aws.IMAGE) < emulators < forward < provision < platform
    local_port = cmds[forward].argv[cmds[forward].argv.index("svc/moto") + 1].split(":")[0]
    argv = cmds[provision].argv
    assert argv[argv.index("--endpoint") + 1] == f"http://127.0.0.1:{local_port}"
    assert argv[argv.index("--tenants") + 1] == "tenanta,tenantb"


def test_artifacts_and_calls_appear_in_the_plan(steps):
    cmds = commands(steps)
    assert any(c.argv[3:5] == ("proxy-config", "all") and c.argv[-2:] == ("-o", "json") for c in cmds)
    assert any("logs" in c.argv for c in cmds) and any("events" in c.argv for c in cmds)
    assert any("exec" in c.argv and c.stdin_label for c in cmds)
    assert any("port-forward" in c.argv for c in cmds)


def test_the_dry_run_command_line_prints_the_plan(capsys):
    # what `make test-local DRY_RUN=1` runs
    assert main(["plan", "kind", "--kind-cluster", "other"]) == 0
    out = capsys.readouterr().out
    assert "Plan of a kind run (dry run" in out
    assert f"kind: {versions.KIND}" in out
    assert "create cluster --name other" in out
