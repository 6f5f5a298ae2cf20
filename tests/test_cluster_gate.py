"""The Istio pre-upgrade gate on a cluster: canary revision beside the current one,
gateway and one tenant moved, suites across the skew, precheck and analyze; a
one-screen verdict that fails on any failed step."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest

from fixtures.cluster import gate, istio, versions
from fixtures.cluster.__main__ import main
from fixtures.cluster.commands import Command, Poll
from fixtures.cluster.fakes import healthy_cluster, kind_tools, pods_on_revision
from fixtures.cluster.plan import kind_plan
from fixtures.cluster.tools import Tools
from fixtures.kind.backend import KindPlatform
from fixtures.manifests import kubectl as real_kubectl
from fixtures.manifests import overlay_dir

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
CURRENT, TARGET = versions.ISTIO, versions.ISTIO_RELEASES[1]
REV = versions.istio_revision(TARGET)


def test_target_versions_resolve_to_pinned_releases():
    assert gate.resolve_target(TARGET.rsplit(".", 1)[0]) == TARGET
    assert gate.resolve_target(TARGET) == TARGET
    for wrong in ("1.31", "1", "2.0.0", ""):
        with pytest.raises(ValueError, match="the gate knows"):
            gate.resolve_target(wrong)


def test_verdict_reads_like_the_offline_gates_and_fails_on_any_failure():
    v = gate.Verdict("Istio upgrade gate: a -> b", label="istio-b")
    v.add("precheck", gate.PASS, "no errors", 3.2)
    v.add("suites", gate.FAIL, "3 failed, 9 passed\nFAILED suites/isolation/test_x.py::test_y", 75)
    v.add("analyze", gate.SKIP, "not run: install did not pass")
    lines = v.render().splitlines()
    assert lines[:4] == ["Istio upgrade gate: a -> b",
                         "  PASS  precheck no errors  [3s]",
                         "  FAIL  suites   3 failed, 9 passed  [75s]",
                         "  SKIP  analyze  not run: install did not pass  [0s]"]
    assert lines[4] == "verdict: FAIL (1 of 3 checks failed) in 1m18s"
    assert lines[5:] == ["--- istio-b suites:", "FAILED suites/isolation/test_x.py::test_y"]
    assert not v.passed
    ok = gate.Verdict("t")
    ok.add("x", gate.PASS)
    assert ok.passed and ok.render().endswith("verdict: PASS (0 of 1 checks failed) in 0m00s")
    assert not gate.Verdict("empty").passed


@pytest.fixture(scope="module")
def rendered() -> str:
    return subprocess.run([real_kubectl(), "kustomize", str(overlay_dir(PLATFORM, "kind"))], capture_output=True,
                          text=True, check=True).stdout


def attached(tmp_path: Path, rendered: str, extra=()) -> tuple[KindPlatform, object]:
    t = kind_tools(tmp_path / "tools", istio_versions=(CURRENT, TARGET), kind_version=versions.KIND)
    fakes = t["fakes"]
    pytest_fake = fakes.install("pytest")
    fakes.on("pytest", stdout="== 14 passed in 30.2s ==\n")
    fakes.on("kubectl", "kustomize", stdout=rendered)
    for rule in extra:
        fakes.sequence(*rule[0], answers=rule[1])
    fakes.on("kubectl", "get", "pods", "istio=ingressgateway", stdout=pods_on_revision(REV, ("gw-1",)))
    fakes.sequence("kubectl", "get", "pods", "tenanta", answers=[
        {"stdout": pods_on_revision(versions.istio_revision(CURRENT))}, {"stdout": pods_on_revision(REV)}])
    healthy_cluster(fakes, real_kubectl(), istio_versions=(CURRENT, TARGET), kind_version=versions.KIND)
    tools = Tools(kind=t["kind"], kubectl=t["kubectl"], docker=t["docker"], istioctl=t["istioctl"],
                  root=tmp_path / "tools")
    plat = KindPlatform(PLATFORM, cluster_name="g", attach=True, runner=fakes.runner(tmp_path / "log"), tools=tools,
                        artifacts_dir=tmp_path / "artifacts", run_id="gate1")
    plat.kubectl.poll_interval = 0.01
    plat.cognito.start = lambda tenants: None
    plat.start()
    return plat, fakes, str(pytest_fake)


def call_label(call: dict) -> str:
    a = call["argv"]
    if call["tool"] == "kubectl" and a[:1] == ["--context"]:
        return f"kubectl:{a[2]}"
    return f"{call['tool']}:{a[0] if a else ''}"


def test_gate_moves_gateway_and_one_tenant_then_runs_suites_and_checks(tmp_path, rendered, monkeypatch):
    plat, fakes, pytest_fake = attached(tmp_path, rendered)
    monkeypatch.setattr(gate, "suites_command", lambda backend, platform_dir, extra, junit: (
        pytest_fake, "suites/isolation", "suites/ingress", f"--backend={backend}", "--cluster-attach", *extra))
    try:
        verdict = gate.run_gate(plat, TARGET, suites_extra=["--kind-cluster=g"])
    finally:
        plat.close()
    assert verdict.passed, verdict.render()
    assert [(c.name, c.status) for c in verdict.checks] == [
        (n, gate.PASS) for n in ("precheck", "install", "gateway", "tenant", "suites", "analyze")]
    assert "14 passed in 30.2s" in verdict.render()
    target_tool = [a for a in fakes.argvs(f"istioctl-{TARGET}")]
    assert [a[0] if a[0] != "x" else "precheck" for a in target_tool] == ["version", "precheck", "install", "analyze"]
    assert f"revision={REV}" in target_tool[2]
    # the new revision's proxies log and count as the suites read them, like the first one's
    flags = istio.observability_flags()
    start = target_tool[2].index(flags[1]) - 1
    assert target_tool[2][start:start + len(flags)] == flags
    assert fakes.argvs(f"istioctl-{CURRENT}") == []  # the current control plane is left alone
    kubectl = [a for a in fakes.argvs("kubectl") if a[0] == "--context"]
    patch = next(a for a in kubectl if "patch" in a)
    assert json.loads(patch[patch.index("-p") + 1]) == {"spec": {"template": {"metadata": {"labels": {"istio.io/rev": REV}}}}}
    label = next(a for a in kubectl if "label" in a)
    assert label[-2:] == [f"istio.io/rev={REV}", "istio-injection-"] and "tenanta" in label
    suites = fakes.argvs("pytest")[0]
    assert suites[:4] == ["suites/isolation", "suites/ingress", "--backend=kind", "--cluster-attach"]
    order = [call_label(c) for c in fakes.calls()]
    assert order.index("kubectl:patch") < order.index("kubectl:label") < order.index("pytest:suites/isolation") < \
        order.index(f"istioctl-{TARGET}:analyze")


def test_a_precheck_error_fails_the_gate_and_skips_the_upgrade(tmp_path, rendered):
    plat, fakes, _ = attached(tmp_path, rendered, extra=[
        ((f"istioctl-{TARGET}", "x", "precheck"),
         [{"stdout": "Error [IST0141] (Deployment istio-ingressgateway) insufficient permissions\n", "exit": 1}])])
    try:
        verdict = gate.run_gate(plat, TARGET)
    finally:
        plat.close()
    assert [c.status for c in verdict.checks] == [gate.FAIL] + [gate.SKIP] * 5
    assert "IST0141" in verdict.checks[0].summary
    assert not [a for a in fakes.argvs(f"istioctl-{TARGET}") if a[0] == "install"]
    assert "verdict: FAIL (1 of 6 checks failed)" in verdict.render()


def test_analyze_errors_fail_the_gate(tmp_path, rendered, monkeypatch):
    plat, fakes, pytest_fake = attached(tmp_path, rendered, extra=[
        ((f"istioctl-{TARGET}", "analyze"),
         [{"stdout": "Error [IST0101] (VirtualService tenanta/tenant-host) Referenced gateway not found\n", "exit": 79}])])
    monkeypatch.setattr(gate, "suites_command", lambda *a, **k: (pytest_fake,))
    try:
        verdict = gate.run_gate(plat, TARGET)
    finally:
        plat.close()
    assert verdict.checks[-1].status == gate.FAIL and "IST0101" in verdict.checks[-1].summary
    assert not verdict.passed


def test_the_gate_refuses_the_version_already_running(tmp_path, rendered):
    plat, _, _ = attached(tmp_path, rendered)
    try:
        with pytest.raises(ValueError, match="already runs"):
            gate.run_gate(plat, CURRENT)
    finally:
        plat.close()


def test_gate_dry_run_lists_the_canary_upgrade_in_order():
    steps = kind_plan(PLATFORM, gate_target=TARGET)
    cmds = [s.command if isinstance(s, Poll) else s for s in steps if isinstance(s, (Command, Poll))]
    cmds = [c for c in cmds if c.argv[0] != "#"]
    start = next(i for i, c in enumerate(cmds) if c.argv[1:3] == ("x", "precheck"))
    gate_cmds = [" ".join(c.argv[1:4]) for c in cmds[start:]]
    expected = ["x precheck --context", "install -y --context", "--context kind-tenant-mesh patch",
                "--context kind-tenant-mesh label", "--context kind-tenant-mesh delete", "-m pytest suites/isolation",
                "analyze --context kind-tenant-mesh"]
    positions = [next(i for i, g in enumerate(gate_cmds) if g.startswith(e)) for e in expected]
    assert positions == sorted(positions), gate_cmds
    assert all(f"istio-{TARGET}" in c.argv[0] for c in cmds[start:] if c.tool == "istioctl")


def test_the_gate_command_prints_a_failing_verdict_when_the_cluster_cannot_come_up(tmp_path, monkeypatch, capsys):
    # here: no kind at all (this machine has no Docker either)
    monkeypatch.setenv("KIND_BIN", str(tmp_path / "no-kind"))
    assert main(["gate", "--backend", "kind", "--istio-version", TARGET.rsplit(".", 1)[0],
                 "--kind-cluster", "gate-test", "--artifacts", str(tmp_path / "artifacts"),
                 "--reports", str(tmp_path / "reports")]) == 1
    text = capsys.readouterr().out
    out = text.splitlines()
    assert out[0].endswith(f"Istio {CURRENT} -> {TARGET}")
    assert out[1].startswith(f"  FAIL  platform could not bring the platform up on Istio {CURRENT}")
    assert out[2].startswith("verdict: FAIL (1 of 1 checks failed)")
    assert out[3] == f"--- istio-{TARGET} platform:" and "make cluster-tools" in text
    assert (tmp_path / "artifacts" / "istio-gate" / "setup").is_dir()
    with pytest.raises(SystemExit):
        main(["gate", "--istio-version", "1.31"])
