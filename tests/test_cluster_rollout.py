"""Rollouts on a cluster against a model of Flagger (fixtures.cluster.fake_flagger): the
patch that triggers it, the Canary status read until this revision's verdict (and not once
more), the timeline, a timeout that names the last status, and the revert on exit: after a
rollback the Canary stays Failed on the original spec, after a promotion the primary rolls
back over and the gateway serves the old version again, and the target always goes back
before skipAnalysis is set."""

from __future__ import annotations

import copy
import json
import types

import pytest

from fixtures.cluster.backend import ClusterPlatform
from fixtures.cluster.fake_flagger import FakeFlagger, spec_hash
from fixtures.cluster.fakes import FakeTools
from fixtures.cluster.kubectl import Kubectl
from fixtures.cluster.rollout import ClusterRollout, canary_status, rolled_out
from fixtures.eks.backend import EksPlatform
from fixtures.flagger import Phase
from fixtures.kind.backend import KindPlatform, _canaries_initialized
from fixtures.platform import MissingCapability, Tenant

NS, APP, IMAGE = "tenanta", "rag-api", "ghcr.io/example/platform/rag-api:1.0.0"
CONTEXT = "kind-t1"
CANARY_DOC = {"apiVersion": "flagger.app/v1beta1", "kind": "Canary", "metadata": {"name": APP, "namespace": NS},
              "spec": {"provider": "istio", "targetRef": {"apiVersion": "apps/v1", "kind": "Deployment", "name": APP},
                       "progressDeadlineSeconds": 60, "service": {"port": 8080},
                       "analysis": {"interval": "10s", "threshold": 2, "maxWeight": 20, "stepWeight": 10,
                                    "metrics": [{"name": "request-success-rate", "interval": "1m",
                                                 "thresholdRange": {"min": 99}}]}}}
ENV = [{"name": "TENANT_ID", "valueFrom": {"configMapKeyRef": {"name": "tenant", "key": "name"}}},
       {"name": "FAULT_ERROR_RATE", "value": "0"}, {"name": "FAULT_LATENCY_MS", "value": "0"},
       {"name": "FAULT_CRASH_ON_START", "value": "false"}]
ORIGINAL = {"FAULT_ERROR_RATE": "0", "FAULT_LATENCY_MS": "0", "FAULT_CRASH_ON_START": "false"}
NEW_ENV = [ENV[0], {"name": "FAULT_ERROR_RATE", "value": "0.2"}, *ENV[2:], {"name": "APP_VERSION", "value": "1.1.0"}]
PATH = "/spec/template/spec/containers/1"
TARGET = {"metadata": {"name": APP, "namespace": NS}, "spec": {"template": {"spec": {"containers": [
    {"name": "istio-proxy", "image": "proxyv2"}, {"name": APP, "image": IMAGE, "env": ENV}]}}}}
H0 = spec_hash(TARGET["spec"]["template"])  # the original spec, as Flagger records it


class Prometheus:
    def __init__(self) -> None:
        self.queries: list[str] = []

    def query(self, promql: str) -> list[dict]:
        self.queries.append(promql)
        return [{"value": [0, "180" if "istio_request_duration" in promql else "99.5"]}]


def canary(**analysis) -> dict:
    doc = copy.deepcopy(CANARY_DOC)
    doc["spec"]["analysis"].update(analysis)
    return doc


def make(tmp_path, *, live: dict = CANARY_DOC, flagger: type[FakeFlagger] = FakeFlagger, destructive=True, **model):
    """A ClusterPlatform (the shared hook, without a cluster) whose kubectl and gateway
    are a FakeFlagger's; ``live`` is the Canary on the "cluster", the render has CANARY_DOC."""
    fakes = FakeTools(tmp_path / "fakes")
    kubectl = fakes.install("kubectl")
    fake = flagger(live, TARGET, **model)
    plat = ClusterPlatform.__new__(ClusterPlatform)
    plat.kubectl = Kubectl(fake.executor(fakes, tmp_path / "commands.log"), str(kubectl), CONTEXT, poll_interval=0.01)
    plat.destructive = destructive
    plat.docs = [CANARY_DOC]
    plat._tenants = [Tenant(NS, "tenanta.example.com", "eu-west-1", "p", "id", "c", "iss", "jwks")]
    plat.prom = Prometheus()
    plat.metrics = lambda: plat.prom
    plat.gateway = fake.gateway
    plat.idp = lambda tenant: types.SimpleNamespace(token=lambda: "token")
    return plat, fakes, fake


def calls(fakes) -> list[list[str]]:
    argvs = fakes.argvs("kubectl")
    assert all(a[:2] == ["--context", CONTEXT] for a in argvs)
    return [a[2:] for a in argvs]


def patches(fakes) -> list[tuple[str, str, object]]:
    """(kind, type, patch) of every patch, in order."""
    return [(a[3], a[5], json.loads(a[7])) for a in calls(fakes) if a[0] == "patch"]


def rows(rollout) -> list[tuple]:
    return [(p.phase, p.weight, p.failed_checks) for p in rollout.timeline]


def at_rest_on_the_original(fake: FakeFlagger, phase: str) -> None:
    """Flagger records the original spec as applied and promoted; the primary runs it and
    serves it alone; the target is at zero; skipAnalysis is as it was (absent)."""
    __tracebackhide__ = True
    status = fake.status
    assert (status["phase"], status["lastAppliedSpec"], status["lastPromotedSpec"]) == (phase, H0, H0)
    assert fake.env(fake.primary) == fake.env(fake.target) == ORIGINAL
    assert fake.target["spec"]["replicas"] == 0 and rolled_out(fake.primary)
    assert fake.serving() == {"1.0.0"}
    assert "skipAnalysis" not in fake.canary["spec"]


def test_the_trigger_is_one_json_patch_of_the_target_container(tmp_path):
    plat, fakes, _ = make(tmp_path)
    with plat.rollout(NS, APP, "1.1.0", FAULT_ERROR_RATE="0.2") as rollout:
        rollout.run()
        assert calls(fakes)[:5] == [
            ["get", "canary", APP, "-n", NS, "-o", "json"],  # the live Canary's spec
            ["get", "deployment", APP, "-n", NS, "-o", "json"],
            ["get", "canary", APP, "-n", NS, "-o", "json"],
            ["patch", "-n", NS, "deployment", APP, "--type=json", "-p", json.dumps([
                {"op": "test", "path": f"{PATH}/name", "value": APP},
                {"op": "replace", "path": f"{PATH}/image", "value": IMAGE},
                {"op": "add", "path": f"{PATH}/env", "value": NEW_ENV}])],
            ["get", "canary", APP, "-n", NS, "-o", "json"]]


def test_the_spec_is_the_live_canarys_not_the_renders(tmp_path):
    plat, _, _ = make(tmp_path, live=canary(interval="20s", threshold=3))
    rollout = plat.rollout(NS, APP, "1.1.0")
    assert (rollout.spec.interval_s, rollout.spec.threshold) == (20, 3)
    assert plat.rollout(NS, APP, "1.1.0").spec.metrics == rollout.spec.metrics


def test_a_promotion_is_read_to_succeeded_with_a_row_per_change(tmp_path):
    plat, _, fake = make(tmp_path, every=2)  # Flagger notices the revision one read late
    with plat.rollout(NS, APP, "1.1.0") as rollout:
        status = rollout.run()
    assert status.phase is Phase.SUCCEEDED and str(status).startswith("phase=Succeeded canaryWeight=0")
    # the leftover Succeeded before Flagger noticed the revision is neither a verdict nor a row
    assert rows(rollout) == [(Phase.PROGRESSING, 0, 0), (Phase.PROGRESSING, 10, 0), (Phase.PROGRESSING, 20, 0),
                             (Phase.PROMOTING, 0, 0), (Phase.FINALISING, 0, 0), (Phase.SUCCEEDED, 0, 0)]
    first = rollout.timeline[0]
    assert (first.success_rate, first.p99_ms, dict(first.metrics)) == (None, None, {})  # no traffic yet
    second = rollout.timeline[1]
    assert (second.success_rate, second.p99_ms, dict(second.metrics)) == (99.5, 180.0, {"request-success-rate": 99.5})
    assert 'destination_workload_namespace="tenanta"' in plat.prom.queries[0]
    assert [p.t for p in rollout.timeline] == sorted(p.t for p in rollout.timeline)
    assert rollout.timeline[-1].note == "Succeeded"
    assert rollout.primary == {"image": IMAGE, "env": {**ORIGINAL, "APP_VERSION": "1.1.0"}}
    assert rollout.started_at <= rollout.finished_at
    assert fake.promoted == ["1.1.0", "1.0.0"]  # the revision, then the original again on exit


def test_a_rollback_is_read_to_failed_and_polling_stops_at_the_first_terminal_phase(tmp_path):
    plat, fakes, _ = make(tmp_path)
    with plat.rollout(NS, APP, "1.1.0", FAULT_ERROR_RATE="0.2") as rollout:
        status = rollout.run()
        reads = [a for a in calls(fakes) if a[:2] == ["get", "canary"]]
        assert len(reads) == 2 + 5  # the live spec and the start, then one per interval to Failed
    assert status.phase is Phase.FAILED and status.failed_checks == 0  # a rollback resets them
    assert rows(rollout) == [(Phase.PROGRESSING, 0, 0), (Phase.PROGRESSING, 10, 0), (Phase.PROGRESSING, 10, 1),
                             (Phase.PROGRESSING, 10, 2), (Phase.FAILED, 0, 0)]
    assert rollout.timeline[-1].success_rate == 99.5  # it had traffic


def test_exit_after_a_rollback_puts_the_target_back_and_leaves_the_canary_failed(tmp_path):
    plat, fakes, fake = make(tmp_path)
    with plat.rollout(NS, APP, "1.1.0", FAULT_ERROR_RATE="0.2") as rollout:
        rollout.revert_timeout = 3
        assert rollout.run().phase is Phase.FAILED
    # no new analysis, no skipAnalysis: Flagger ignores a target equal to the promoted spec
    assert patches(fakes) == [
        ("deployment", "--type=json", [{"op": "test", "path": f"{PATH}/name", "value": APP},
                                       {"op": "replace", "path": f"{PATH}/image", "value": IMAGE},
                                       {"op": "add", "path": f"{PATH}/env", "value": NEW_ENV}]),
        ("deployment", "--type=json", [{"op": "test", "path": f"{PATH}/name", "value": APP},
                                       {"op": "replace", "path": f"{PATH}/image", "value": IMAGE},
                                       {"op": "add", "path": f"{PATH}/env", "value": ENV}])]
    at_rest_on_the_original(fake, "Failed")
    assert fake.promoted == []


def test_the_model_stays_failed_on_the_promoted_spec_and_analyses_a_new_one(tmp_path):
    """As Flagger does (pkg/canary/spec.go hasSpecChanged, 'do not trigger a canary
    deployment on manual rollback'), even with skipAnalysis set."""
    plat, _, fake = make(tmp_path)
    with plat.rollout(NS, APP, "1.1.0", FAULT_ERROR_RATE="0.2") as rollout:
        rollout.run()
        back = rollout._original["env"]
        plat.kubectl.patch("canary", APP, {"spec": {"skipAnalysis": True}}, namespace=NS, what="skip",
                           patch_type="merge")
        rollout._patch_target({"image": IMAGE, "env": back}, "back")
        for _ in range(5):
            plat.kubectl.get_json("canary", APP, namespace=NS)
        assert (fake.status["phase"], fake.status["lastAppliedSpec"], fake.promoted) == ("Failed", H0, [])
        rollout._patch_target({"image": IMAGE, "env": [*back, {"name": "APP_VERSION", "value": "1.2.0"}]}, "retry")
        plat.kubectl.get_json("canary", APP, namespace=NS)
        assert fake.status["phase"] == "Progressing"
        plat.kubectl.get_json("canary", APP, namespace=NS)
        assert (fake.status["phase"], fake.promoted) == ("Succeeded", ["1.2.0"])  # skipped analysis
        plat.kubectl.patch("canary", APP, {"spec": {"skipAnalysis": None}}, namespace=NS, what="skip",
                           patch_type="merge")


def test_exit_after_a_promotion_waits_for_the_primarys_pods_and_the_gateway(tmp_path):
    # Skipping the analysis, Flagger sets Succeeded as it copies the spec: the primary's
    # old pods still answer for as long as its rollout takes.
    plat, fakes, fake = make(tmp_path, rollout_calls=12)
    with plat.rollout(NS, APP, "1.1.0") as rollout:
        assert rollout.run().phase is Phase.SUCCEEDED
        during = len(calls(fakes))
    at_rest_on_the_original(fake, "Succeeded")
    assert fake.promoted == ["1.1.0", "1.0.0"]
    assert [(kind, p if kind == "canary" else p[-1]["value"]) for kind, _, p in patches(fakes)][1:] == [
        ("deployment", ENV), ("canary", {"spec": {"skipAnalysis": True}}),
        ("canary", {"spec": {"skipAnalysis": None}})]
    after = calls(fakes)[during:]
    assert ["get", "deployment", f"{APP}-primary", "-n", NS, "-o", "json"] in after


def test_an_interrupted_analysis_never_promotes_the_revision_on_exit(tmp_path):
    # Flagger may run between any two commands; with skipAnalysis set while the target
    # still held the revision, that interval would promote the revision.
    plat, fakes, fake = make(tmp_path, live=canary(threshold=1000), tick_after_patch=True)
    with pytest.raises(AssertionError, match="not finished after 0.2s") as err:
        with plat.rollout(NS, APP, "1.1.0", FAULT_ERROR_RATE="0.2") as rollout:
            rollout.run(timeout=0.2)
    assert "1.1.0" not in fake.promoted and fake.promoted[-1] == "1.0.0"
    assert not getattr(err.value, "__notes__", []), err.value.__notes__
    assert [kind for kind, _, _ in patches(fakes)] == ["deployment", "deployment", "canary", "canary"]
    at_rest_on_the_original(fake, "Succeeded")


def test_a_timeout_names_the_last_status_and_still_reverts(tmp_path):
    plat, _, fake = make(tmp_path, deadline=10**6)  # a canary that never becomes ready, never rolled back
    with pytest.raises(AssertionError) as err:
        with plat.rollout(NS, APP, "1.1.0", FAULT_CRASH_ON_START="true") as rollout:
            rollout.run(timeout=0.3)
    text = str(err.value)
    assert "not finished after 0.3s" in text and "phase=Progressing canaryWeight=0 failedChecks=0" in text
    assert not getattr(err.value, "__notes__", [])
    at_rest_on_the_original(fake, "Succeeded")


def test_a_failed_revert_is_reported_without_hiding_the_error_in_flight(tmp_path):
    plat, fakes, _ = make(tmp_path, deadline=10**6, refuse=(("patch", "canary"),))
    with pytest.raises(AssertionError, match="not finished") as err:
        with plat.rollout(NS, APP, "1.1.0", FAULT_CRASH_ON_START="true") as rollout:
            rollout.revert_timeout = 0.1
            rollout.run(timeout=0.1)
    assert any("could not revert" in n and "forbidden" in n.lower() for n in err.value.__notes__)
    # the target went back even though the Canary could not be patched
    assert [p[-1]["value"] for kind, _, p in patches(fakes) if kind == "deployment"] == [
        [*ENV[:3], {"name": "FAULT_CRASH_ON_START", "value": "true"}, {"name": "APP_VERSION", "value": "1.1.0"}], ENV]


def test_a_failed_canary_rewriting_its_status_is_no_verdict_of_this_revision(tmp_path):
    # Flagger rewrites a Failed Canary's lastAppliedSpec and lastTransitionTime every
    # interval; only a changed Promoted condition is a new verdict.
    plat, _, fake = make(tmp_path, phase="Failed")
    rollout = plat.rollout(NS, APP, "1.1.0")
    rollout._prepare()
    rewritten = copy.deepcopy(fake.canary)
    rewritten["status"].update(lastAppliedSpec="another", lastTransitionTime="later")
    with pytest.raises(AssertionError, match="has not picked up 1.1.0"):
        rollout._observe(rewritten)


def test_a_rollout_from_a_settled_failed_canary_is_promoted_and_reverted(tmp_path):
    plat, _, fake = make(tmp_path, phase="Failed", every=2)
    with plat.rollout(NS, APP, "1.1.0") as rollout:
        assert rollout.run().phase is Phase.SUCCEEDED
    assert rows(rollout)[0] == (Phase.PROGRESSING, 0, 0)
    at_rest_on_the_original(fake, "Succeeded")


@pytest.mark.parametrize("phase", ["Progressing", "Initializing"])
def test_a_busy_canary_is_refused_before_anything_changes(tmp_path, phase):
    plat, fakes, fake = make(tmp_path, phase=phase, every=10**6)
    with pytest.raises(RuntimeError, match=f"is {phase}: Flagger is busy"):
        with plat.rollout(NS, APP, "1.1.0") as rollout:
            rollout.run()
    assert not patches(fakes)


def test_a_failed_canary_whose_target_was_not_put_back_is_refused(tmp_path):
    plat, fakes, fake = make(tmp_path, phase="Failed")
    fake.target["spec"]["template"]["spec"]["containers"][1]["image"] = "rag-api:0.9.0"
    fake.status["lastAppliedSpec"] = spec_hash(fake.target["spec"]["template"])  # Flagger synced it
    with pytest.raises(RuntimeError, match="with a target the primary does not run"):
        with plat.rollout(NS, APP, "1.1.0") as rollout:
            rollout.run()
    assert not patches(fakes)


def test_an_unknown_variable_is_refused_before_anything_changes(tmp_path):
    plat, fakes, _ = make(tmp_path)
    with pytest.raises(ValueError, match="FAULT_TYPO is not an environment variable"):
        with plat.rollout(NS, APP, "1.1.0", FAULT_TYPO="1") as rollout:
            rollout.run()
    assert not patches(fakes)


def test_without_prometheus_the_observed_values_are_none(tmp_path):
    plat, _, _ = make(tmp_path)

    def unreachable():
        raise OSError("connection refused")

    plat.metrics = unreachable
    with plat.rollout(NS, APP, "1.1.0", FAULT_ERROR_RATE="0.2") as rollout:
        rollout.run()
    assert all(p.success_rate is None and p.p99_ms is None for p in rollout.timeline)
    assert rollout.timeline[-1].metrics == {"request-success-rate": None}


def test_flagger_phases_outside_the_shared_ones():
    assert canary_status({"status": {"phase": "WaitingPromotion", "canaryWeight": 20}}).phase is Phase.PROGRESSING
    assert canary_status({}).phase is Phase.INITIALIZED
    with pytest.raises(AssertionError, match="'Bogus'"):
        canary_status({"status": {"phase": "Bogus"}})


def test_a_rollout_is_complete_when_no_old_replica_is_left():
    done = {"metadata": {"name": "p", "generation": 3}, "spec": {"replicas": 2},
            "status": {"observedGeneration": 3, "replicas": 2, "updatedReplicas": 2, "availableReplicas": 2}}
    assert rolled_out(done)
    for change, why in [({"observedGeneration": 2}, "not observed"), ({"replicas": 3}, "rolling out"),
                        ({"availableReplicas": 1}, "rolling out"), ({"updatedReplicas": 1}, "rolling out")]:
        with pytest.raises(AssertionError, match=why):
            rolled_out({**done, "status": {**done["status"], **change}})


def test_the_cluster_backends_offer_rollout_only_where_they_may_change_the_platform(tmp_path):
    assert "rollout" in KindPlatform.capabilities and "rollout" in EksPlatform.capabilities
    plat, _, _ = make(tmp_path)
    plat.name = "eks"
    plat.requires("rollout")
    assert isinstance(plat.rollout(NS, APP, "1.1.0"), ClusterRollout)
    plat.destructive = False
    for attempt in (lambda: plat.requires("rollout"), lambda: plat.rollout(NS, APP, "1.1.0")):
        with pytest.raises(MissingCapability, match="--destructive"):
            attempt()


class ClaimsPromotion(FakeFlagger):
    """A Flagger that reports a promotion it did not make."""

    def _promote(self, phase: str) -> None:
        self._set_phase(phase)


def test_succeeded_with_the_old_spec_on_the_primary_is_an_error(tmp_path):
    plat, _, _ = make(tmp_path, flagger=ClaimsPromotion)
    with plat.rollout(NS, APP, "1.1.0") as rollout:
        with pytest.raises(AssertionError, match="Succeeded, but rag-api-primary runs"):
            rollout.run()


# -- the kind backend waits for Canaries at rest (fixtures/kind/backend.py) -----------------

def canaries(*statuses: dict) -> dict:
    return {"items": [{"metadata": {"name": f"c{i}"}, "status": s} for i, s in enumerate(statuses)]}


def test_a_failed_canary_back_on_its_promoted_spec_is_at_rest():
    settled_failed = {"phase": "Failed", "lastAppliedSpec": "h0", "lastPromotedSpec": "h0"}
    assert _canaries_initialized(canaries({"phase": "Initialized"}, {"phase": "Succeeded"}, settled_failed))
    for status, why in [({"phase": "Failed", "lastAppliedSpec": "h1", "lastPromotedSpec": "h0"},
                         "c0 (Failed with a target its primary does not run)"),
                        ({"phase": "Failed"}, "c0 (Failed with a target"),
                        ({"phase": "Progressing"}, "c0 (Progressing)")]:
        with pytest.raises(AssertionError, match=why.replace("(", r"\(").replace(")", r"\)")):
            _canaries_initialized(canaries(status))
    with pytest.raises(AssertionError, match="no Canary yet"):
        _canaries_initialized({"items": []})
