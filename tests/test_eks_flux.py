"""A destructive EKS run holds Flux still (fixtures.eks.flux), against fake kubectl: the
Kustomizations of platform/gitops suspended before the first change and resumed at close,
in dependency order, also after a failed start; one suspended by a person left alone;
one held by another run refuses the start; a failed resume reported with the command to
run by hand; a run without --destructive never touching Flux; the dry run showing it."""

from __future__ import annotations

import json
import shlex

import pytest

from fixtures.cluster.__main__ import main
from fixtures.cluster.commands import Command, CommandError, Poll
from fixtures.cluster.kubectl import FIELD_MANAGER
from fixtures.cluster.plan import eks_plan
from fixtures.eks.flux import (RESOURCE, SUSPENDED_BY, FluxHoldError, KustomizationRef, delivered_by, resume_patch,
                               suspend_patch)
from fixtures.manifests import kubectl as real_kubectl
from fixtures.manifests import overlay_dir, render
from test_eks_backend import PLATFORM, TENANTS, eks_render, fakes, make  # noqa: F401 - fixtures reused

GITOPS = overlay_dir(PLATFORM, "gitops")
MESH, TENANT_A, TENANT_B = "mesh", f"tenant-{TENANTS[0]}", f"tenant-{TENANTS[1]}"
FORBIDDEN = "Error from server (Forbidden): kustomizations.kustomize.toolkit.fluxcd.io is forbidden\n"


def kustomization(name: str, *, suspend: bool = False, holder: str | None = None) -> str:
    meta = {"name": name, "namespace": "flux-system"}
    if holder is not None:
        meta["annotations"] = {SUSPENDED_BY: holder}
    return json.dumps({"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization", "metadata": meta,
                       "spec": {"path": f"./platform/{name}", "suspend": suspend}})


@pytest.fixture
def flux(fakes):  # noqa: F811 - the fixture imported above
    """The fakes, with platform/gitops rendered for real (ahead of the overlay's canned
    render) and every Kustomization of it on the cluster, not suspended."""
    fakes.rules.insert(0, {"tool": "kubectl", "has": ["kustomize", str(GITOPS)],
                           "answers": [{"delegate": real_kubectl()}]})
    fakes.save()
    return fakes


def on_cluster(fakes, name: str, **state) -> None:
    fakes.on("kubectl", "get", RESOURCE, name, stdout=kustomization(name, **state))


def all_on_cluster(fakes, **special) -> None:
    for name in (MESH, TENANT_A, TENANT_B):
        if name in special:
            if special[name] is not None:
                on_cluster(fakes, name, **special[name])
        else:
            on_cluster(fakes, name)


def flux_calls(fakes) -> list[tuple[str, str]]:
    """(get | suspend | resume, name) of every kubectl call on a Kustomization, in order."""
    out = []
    for a in fakes.argvs("kubectl"):
        if RESOURCE in a:
            verb = a[2]
            if verb == "patch":
                verb = "suspend" if json.loads(a[a.index("-p") + 1])["spec"]["suspend"] else "resume"
            out.append((verb, a[a.index(RESOURCE) + 1]))
    return out


def first(fakes, predicate) -> int:
    return next(i for i, a in enumerate(fakes.argvs("kubectl")) if predicate(a))


def last(fakes, predicate) -> int:
    return max(i for i, a in enumerate(fakes.argvs("kubectl")) if predicate(a))


def is_patch(kind: str):
    return lambda a: RESOURCE in a and "patch" in a and json.loads(a[a.index("-p") + 1])["spec"]["suspend"] == (
        kind == "suspend")


GETS = [("get", MESH), ("get", TENANT_A), ("get", TENANT_B)]


def test_the_kustomizations_of_platform_gitops_in_dependency_order():
    refs = delivered_by(render(PLATFORM, "gitops"))
    assert refs[0] == KustomizationRef("flux-system", MESH), "the mesh, which every tenant depends on, comes first"
    assert {r.name for r in refs} == {MESH, *(f"tenant-{t}" for t in TENANTS)}
    docs = [{"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
             "metadata": {"name": "apps", "namespace": "flux-system"}, "spec": {"dependsOn": [{"name": "infra"}]}},
            {"apiVersion": "kustomize.config.k8s.io/v1beta1", "kind": "Kustomization", "metadata": {"name": "x"}},
            {"apiVersion": "kustomize.toolkit.fluxcd.io/v1", "kind": "Kustomization",
             "metadata": {"name": "infra", "namespace": "flux-system"}, "spec": {"dependsOn": [{"name": "elsewhere"}]}}]
    assert [r.name for r in delivered_by(docs)] == ["infra", "apps"]
    docs[2]["spec"]["dependsOn"] = [{"name": "apps"}]
    with pytest.raises(FluxHoldError, match="cycle: flux-system/apps, flux-system/infra"):
        delivered_by(docs)


def test_flux_is_suspended_before_the_first_fault_and_resumed_at_close(flux, tmp_path):
    all_on_cluster(flux)
    plat = make(flux, tmp_path, destructive=True)
    plat.start()
    try:
        with plat.fault("authz-policy-off", tenant=TENANTS[0]):
            pass
    finally:
        plat.close()
    assert flux_calls(flux) == GETS + [("suspend", TENANT_B), ("suspend", TENANT_A), ("suspend", MESH),
                                       ("resume", MESH), ("resume", TENANT_A), ("resume", TENANT_B)]
    fault = first(flux, lambda a: "delete" in a and "-f" in a)
    restored = last(flux, lambda a: "apply" in a)
    assert last(flux, is_patch("suspend")) < fault < restored < first(flux, is_patch("resume"))
    assert last(flux, lambda a: "namespace" in a and "delete" in a) < first(flux, is_patch("resume"))
    for a in flux.argvs("kubectl"):
        if RESOURCE in a and "patch" in a:
            assert a[:2] == ["--context", "platform-eks"] and a[a.index("-n") + 1] == "flux-system"
            # not kubectl's own manager, whose fields Flux's parent Kustomization takes over and drops
            assert f"--field-manager={FIELD_MANAGER}" in a and not FIELD_MANAGER.startswith("kubectl")
            assert a[-1] in (suspend_patch("run7"), resume_patch())
    assert json.loads(suspend_patch("run7"))["metadata"]["annotations"] == {SUSPENDED_BY: "run7"}
    assert json.loads(resume_patch())["metadata"]["annotations"] == {SUSPENDED_BY: None}  # removed
    assert plat.flux.resumed == [KustomizationRef("flux-system", n) for n in (MESH, TENANT_A, TENANT_B)]
    assert plat.flux.suspended == []
    log = (tmp_path / "log").read_text()
    assert f"# release Flux: resume flux-system/{MESH}, flux-system/{TENANT_A}, flux-system/{TENANT_B}" in log


def test_a_kustomization_suspended_by_a_person_is_left_alone(flux, tmp_path):
    all_on_cluster(flux, **{MESH: {"suspend": True}, TENANT_B: {"holder": "an-old-run"}})
    plat = make(flux, tmp_path, destructive=True)
    plat.start()
    plat.close()
    # the mesh is neither suspended nor resumed; a stale annotation on a running one is taken over
    assert flux_calls(flux) == GETS + [("suspend", TENANT_B), ("suspend", TENANT_A),
                                       ("resume", TENANT_A), ("resume", TENANT_B)]
    assert plat.flux.left_alone == [KustomizationRef("flux-system", MESH)]
    assert f"left as found, suspended by someone else (no run annotation), not resumed by this run: " \
           f"flux-system/{MESH}" in (tmp_path / "log").read_text()


def test_another_runs_suspension_refuses_the_start_naming_the_run_and_the_command(flux, tmp_path):
    all_on_cluster(flux, **{TENANT_A: {"suspend": True, "holder": "20250101000000-dead01"}})
    plat = make(flux, tmp_path, destructive=True)
    with pytest.raises(FluxHoldError) as err:
        plat.start()
    message = str(err.value)
    assert f"Flux Kustomization flux-system/{TENANT_A} is suspended by run 20250101000000-dead01" in message
    assert ("kubectl --context platform-eks get namespaces -l platform.example.com/suite-run=20250101000000-dead01"
            in message)
    by_hand = message.split("resume by hand with `")[1].split("`")[0]
    assert shlex.split(by_hand) == ["kubectl", "--context", "platform-eks", "patch", RESOURCE, TENANT_A, "-n",
                                    "flux-system", "--type=merge", f"--field-manager={FIELD_MANAGER}", "-p",
                                    resume_patch()]
    assert flux_calls(flux) == GETS, "nothing is suspended when one is held by another run"
    assert plat.flux.suspended == []


def test_a_missing_kustomization_refuses_the_start_naming_it(flux, tmp_path):
    all_on_cluster(flux, **{MESH: None})
    plat = make(flux, tmp_path, destructive=True)
    with pytest.raises(FluxHoldError, match=f"not on context platform-eks: flux-system/{MESH}\\."):
        plat.start()
    assert flux_calls(flux) == GETS


def test_a_failed_resume_is_reported_with_the_command_and_the_others_are_resumed(flux, tmp_path):
    all_on_cluster(flux)
    flux.on("kubectl", "patch", RESOURCE, TENANT_A, resume_patch(), stderr=FORBIDDEN, exit=1)
    plat = make(flux, tmp_path, destructive=True)
    plat.start()
    with pytest.raises(RuntimeError) as err:
        plat.close()
    message = str(err.value)
    assert message.startswith("cleanup incomplete: tear_down: Flux Kustomization "
                              f"flux-system/{TENANT_A} is still suspended (")
    assert "Forbidden" in message
    by_hand = message.split("resume it by hand: `")[1].split("`")[0]
    failed = next(a for a in flux.argvs("kubectl") if TENANT_A in a and resume_patch() in a)
    assert shlex.split(by_hand) == ["kubectl", *failed]
    assert flux_calls(flux)[-3:] == [("resume", MESH), ("resume", TENANT_A), ("resume", TENANT_B)]
    assert plat.flux.suspended == [KustomizationRef("flux-system", TENANT_A)]


def test_a_start_failing_after_the_suspension_resumes_flux(flux, tmp_path):
    all_on_cluster(flux)
    flux.on("kubectl", "get", "secret", stderr="Error from server (Forbidden)\n", exit=1)
    plat = make(flux, tmp_path, destructive=True)
    with pytest.raises(CommandError, match="Forbidden"):
        plat.start()
    assert flux_calls(flux)[-3:] == [("resume", MESH), ("resume", TENANT_A), ("resume", TENANT_B)]


def test_a_suspension_failing_part_way_resumes_what_it_suspended_and_nothing_else(flux, tmp_path):
    all_on_cluster(flux)
    flux.on("kubectl", "patch", RESOURCE, TENANT_A, suspend_patch("run7"), stderr=FORBIDDEN, exit=1)
    plat = make(flux, tmp_path, destructive=True)
    with pytest.raises(CommandError, match="suspend Flux Kustomization"):
        plat.start()
    # tenant A's patch may have been applied even though it failed, so it is resumed too
    assert flux_calls(flux) == GETS + [("suspend", TENANT_B), ("suspend", TENANT_A),
                                       ("resume", TENANT_A), ("resume", TENANT_B)]


def test_a_run_without_destructive_never_touches_flux(flux, tmp_path):
    all_on_cluster(flux)
    plat = make(flux, tmp_path)
    plat.start()
    plat.close()
    assert plat.flux is None
    assert not [a for a in flux.argvs("kubectl") if RESOURCE in a or str(GITOPS) in a]


# --- the dry run --------------------------------------------------------------------------


def plan_commands(destructive: bool) -> list[Command]:
    steps = eks_plan(PLATFORM, context="shared", destructive=destructive)
    cmds = [s.command if isinstance(s, Poll) else s for s in steps]
    return [c for c in cmds if isinstance(c, Command) and c.argv[0] != "#"]


def test_the_destructive_plan_suspends_then_faults_then_resumes():
    cmds = plan_commands(destructive=True)
    patches = [(c.argv[c.argv.index(RESOURCE) + 1], c.argv[-1]) for c in cmds if "patch" in c.argv]
    assert patches == [(TENANT_B, suspend_patch("dry-run")), (TENANT_A, suspend_patch("dry-run")),
                       (MESH, suspend_patch("dry-run")),
                       (MESH, resume_patch()), (TENANT_A, resume_patch()), (TENANT_B, resume_patch())]
    at = {c.what: i for i, c in enumerate(cmds)}
    suspended = at[f"suspend Flux Kustomization flux-system/{MESH} for run dry-run"]
    assert suspended < at["tenant namespaces"], "Flux is held before the run creates anything"
    assert suspended < at[f"delete AuthorizationPolicies in ['{TENANTS[0]}']"] < at["restore the AuthorizationPolicies"]
    assert at["delete the namespaces of run dry-run"] < at[f"resume Flux Kustomization flux-system/{MESH} suspended "
                                                           "by run dry-run"]
    assert not [c for c in plan_commands(destructive=False) if RESOURCE in c.argv or str(GITOPS) in c.argv]


def test_the_command_line_prints_the_destructive_plan(capsys):
    assert main(["plan", "eks", "--destructive", "--context", "shared"]) == 0
    out = capsys.readouterr().out
    suspend = out.index(f"patch {RESOURCE} {MESH} -n flux-system --type=merge --field-manager={FIELD_MANAGER} -p "
                        + shlex.quote(suspend_patch("dry-run")))
    resume = out.index(f"patch {RESOURCE} {MESH} -n flux-system --type=merge --field-manager={FIELD_MANAGER} -p "
                       + shlex.quote(resume_patch()))
    assert suspend < out.index("## a fault") < out.index("## teardown") < resume
    assert main(["plan", "eks", "--context", "shared"]) == 0
    assert RESOURCE not in capsys.readouterr().out
    with pytest.raises(SystemExit) as exit_:
        main(["plan", "kind", "--destructive"])
    assert exit_.value.code == 2
    assert "plan --destructive is for eks only" in capsys.readouterr().err
