"""Rollouts on a cluster against a fake kubectl: the patch that triggers Flagger, the
Canary status read until this revision's verdict (and not once more), the timeline, the
revert on exit and on failure, and a timeout that names the last status."""

from __future__ import annotations

import json

import pytest

from fixtures.cluster.backend import ClusterPlatform
from fixtures.cluster.fakes import FakeTools
from fixtures.cluster.kubectl import Kubectl
from fixtures.cluster.rollout import ClusterRollout, canary_status
from fixtures.eks.backend import EksPlatform
from fixtures.flagger import Phase
from fixtures.kind.backend import KindPlatform
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
NEW_ENV = [ENV[0], {"name": "FAULT_ERROR_RATE", "value": "0.2"}, *ENV[2:], {"name": "APP_VERSION", "value": "1.1.0"}]
PATH = "/spec/template/spec/containers/1"


def deployment(name: str, env: list[dict]) -> dict:
    return {"stdout": json.dumps({"metadata": {"name": name, "namespace": NS}, "spec": {"template": {"spec": {
        "containers": [{"name": "istio-proxy", "image": "proxyv2"}, {"name": APP, "image": IMAGE, "env": env}]}}}})}


def canary(phase: str, weight: int = 0, failed: int = 0, applied: str = "h1", when: str = "t1") -> dict:
    return {"stdout": json.dumps({"metadata": {"name": APP, "namespace": NS}, "spec": CANARY_DOC["spec"],
                                  "status": {"phase": phase, "canaryWeight": weight, "failedChecks": failed,
                                             "lastAppliedSpec": applied, "lastTransitionTime": when,
                                             "conditions": [{"type": "Promoted", "message": f"{phase} {weight}"}]}})}


BEFORE = canary("Succeeded", applied="h0", when="t0")   # the Canary as the previous rollout left it


class Prometheus:
    def __init__(self) -> None:
        self.queries: list[str] = []

    def query(self, promql: str) -> list[dict]:
        self.queries.append(promql)
        return [{"value": [0, "180" if "istio_request_duration" in promql else "99.5"]}]


def make(tmp_path, canaries: list[dict], primary: list[dict] | None = None, extra=(), destructive=True):
    fakes = FakeTools(tmp_path / "fakes")
    kubectl = fakes.install("kubectl")
    for rule in extra:  # specific rules first: the first match answers
        fakes.sequence("kubectl", *rule[0], answers=rule[1])
    fakes.sequence("kubectl", "get", "canary", APP, answers=canaries)
    fakes.sequence("kubectl", "get", "deployment", f"{APP}-primary",
                   answers=primary or [deployment(f"{APP}-primary", ENV)])
    fakes.on("kubectl", "get", "deployment", APP, **deployment(APP, ENV))
    plat = ClusterPlatform.__new__(ClusterPlatform)  # the shared hook, without a cluster
    plat.kubectl = Kubectl(fakes.runner(tmp_path / "commands.log"), str(kubectl), CONTEXT, poll_interval=0.01)
    plat.destructive = destructive
    plat.docs = [CANARY_DOC]
    plat._tenants = [Tenant(NS, "tenanta.example.com", "eu-west-1", "p", "id", "c", "iss", "jwks")]
    plat.prom = Prometheus()
    plat.metrics = lambda: plat.prom
    return plat, fakes


def calls(fakes) -> list[list[str]]:
    argvs = fakes.argvs("kubectl")
    assert all(a[:2] == ["--context", CONTEXT] for a in argvs)
    return [a[2:] for a in argvs]


def patches(fakes) -> list[tuple[str, str, object]]:
    """(kind, type, patch) of every patch, in order."""
    return [(a[3], a[5], json.loads(a[7])) for a in calls(fakes) if a[0] == "patch"]


def rows(rollout) -> list[tuple]:
    return [(p.phase, p.weight, p.failed_checks) for p in rollout.timeline]


PROMOTED = [BEFORE, BEFORE, canary("Progressing"), canary("Progressing", 10), canary("Progressing", 10),
            canary("Progressing", 20), canary("Promoting", 20), canary("Finalising"), canary("Succeeded")]
ROLLED_BACK = [BEFORE, canary("Progressing"), canary("Progressing", 10), canary("Progressing", 10, 1),
               canary("Progressing", 10, 2), canary("Failed", 0, 2),
               canary("Succeeded", applied="h2", when="t2")]  # after the revert, promoted without analysis


def test_the_trigger_is_one_json_patch_of_the_target_container(tmp_path):
    plat, fakes = make(tmp_path, ROLLED_BACK)
    with plat.rollout(NS, APP, "1.1.0", FAULT_ERROR_RATE="0.2") as rollout:
        rollout.run()
        assert calls(fakes)[:3] == [
            ["get", "deployment", APP, "-n", NS, "-o", "json"],
            ["get", "canary", APP, "-n", NS, "-o", "json"],
            ["patch", "-n", NS, "deployment", APP, "--type=json", "-p", json.dumps([
                {"op": "test", "path": f"{PATH}/name", "value": APP},
                {"op": "replace", "path": f"{PATH}/image", "value": IMAGE},
                {"op": "add", "path": f"{PATH}/env", "value": NEW_ENV}])]]
        assert calls(fakes)[3] == ["get", "canary", APP, "-n", NS, "-o", "json"]


def test_a_promotion_is_read_to_succeeded_with_a_row_per_change(tmp_path):
    new = [*ENV, {"name": "APP_VERSION", "value": "1.1.0"}]
    plat, _ = make(tmp_path, PROMOTED, primary=[deployment(f"{APP}-primary", new), deployment(f"{APP}-primary", ENV)])
    with plat.rollout(NS, APP, "1.1.0") as rollout:
        status = rollout.run()
    assert status.phase is Phase.SUCCEEDED and str(status).startswith("phase=Succeeded canaryWeight=0")
    # the leftover Succeeded before Flagger noticed the revision is neither a verdict nor a row
    assert rows(rollout) == [(Phase.PROGRESSING, 0, 0), (Phase.PROGRESSING, 10, 0), (Phase.PROGRESSING, 20, 0),
                             (Phase.PROMOTING, 20, 0), (Phase.FINALISING, 0, 0), (Phase.SUCCEEDED, 0, 0)]
    first = rollout.timeline[0]
    assert (first.success_rate, first.p99_ms, dict(first.metrics)) == (None, None, {})  # no traffic yet
    second = rollout.timeline[1]
    assert (second.success_rate, second.p99_ms, dict(second.metrics)) == (99.5, 180.0, {"request-success-rate": 99.5})
    assert 'destination_workload_namespace="tenanta"' in plat.prom.queries[0]
    assert [p.t for p in rollout.timeline] == sorted(p.t for p in rollout.timeline)
    assert rollout.timeline[-1].note == "Succeeded 0"
    assert rollout.primary == {"image": IMAGE, "env": {"FAULT_ERROR_RATE": "0", "FAULT_LATENCY_MS": "0",
                                                       "FAULT_CRASH_ON_START": "false", "APP_VERSION": "1.1.0"}}
    assert rollout.started_at <= rollout.finished_at


def test_a_rollback_is_read_to_failed_and_polling_stops_at_the_first_terminal_phase(tmp_path):
    plat, fakes = make(tmp_path, ROLLED_BACK)
    with plat.rollout(NS, APP, "1.1.0", FAULT_ERROR_RATE="0.2") as rollout:
        status = rollout.run()
        reads = [a for a in calls(fakes) if a[:2] == ["get", "canary"]]
        assert len(reads) == len(ROLLED_BACK) - 1  # the read before the trigger, then one per answer to Failed
    assert status.phase is Phase.FAILED and status.failed_checks == 2
    assert rows(rollout) == [(Phase.PROGRESSING, 0, 0), (Phase.PROGRESSING, 10, 0), (Phase.PROGRESSING, 10, 1),
                             (Phase.PROGRESSING, 10, 2), (Phase.FAILED, 0, 2)]
    assert rollout.timeline[-1].success_rate == 99.5  # it had traffic


def test_exit_puts_the_target_back_and_waits_for_the_primary(tmp_path):
    new = deployment(f"{APP}-primary", NEW_ENV)
    plat, fakes = make(tmp_path, PROMOTED, primary=[new, new, new, deployment(f"{APP}-primary", ENV)])
    with plat.rollout(NS, APP, "1.1.0", FAULT_ERROR_RATE="0.2") as rollout:
        rollout.run()
        during = len(calls(fakes))
    after = calls(fakes)[during:]
    assert patches(fakes)[1:] == [
        ("canary", "--type=merge", {"spec": {"skipAnalysis": True}}),
        ("deployment", "--type=json", [{"op": "test", "path": f"{PATH}/name", "value": APP},
                                       {"op": "replace", "path": f"{PATH}/image", "value": IMAGE},
                                       {"op": "add", "path": f"{PATH}/env", "value": ENV}]),
        ("canary", "--type=merge", {"spec": {"skipAnalysis": None}})]
    # the primary ran the new spec on two reads of the wait, the original on the third
    assert [a[:3] for a in after if a[:2] == ["get", "deployment"]] == [["get", "deployment", f"{APP}-primary"]] * 3
    assert after[-1][0] == "patch"  # skipAnalysis restored last


def test_an_exception_in_the_block_still_reverts(tmp_path):
    plat, fakes = make(tmp_path, ROLLED_BACK)
    with pytest.raises(RuntimeError, match="the test failed"):
        with plat.rollout(NS, APP, "1.1.0", FAULT_ERROR_RATE="0.2") as rollout:
            rollout.run()
            raise RuntimeError("the test failed")
    assert [(kind, p if kind == "canary" else p[-1]["value"]) for kind, _, p in patches(fakes)] == [
        ("deployment", NEW_ENV), ("canary", {"spec": {"skipAnalysis": True}}), ("deployment", ENV),
        ("canary", {"spec": {"skipAnalysis": None}})]


def test_a_timeout_names_the_last_status_and_still_reverts(tmp_path):
    plat, fakes = make(tmp_path, [BEFORE, canary("Progressing"), canary("Progressing", 10, 1)])
    with pytest.raises(AssertionError) as err:
        with plat.rollout(NS, APP, "1.1.0", FAULT_LATENCY_MS="600") as rollout:
            rollout.revert_timeout = 0.2
            rollout.run(timeout=0.3)
    text = str(err.value)
    assert any("settled on the original spec" in n for n in err.value.__notes__)  # Flagger never settles here
    assert "not finished after 0.3s" in text and "phase=Progressing canaryWeight=10 failedChecks=1" in text
    assert [kind for kind, _, _ in patches(fakes)] == ["deployment", "canary", "deployment", "canary"]


def test_a_failed_revert_is_reported_without_hiding_the_error_in_flight(tmp_path):
    failing = ((("patch", "canary"), [{"stderr": "forbidden\n", "exit": 1}]),)
    plat, fakes = make(tmp_path, [BEFORE, canary("Progressing", 10)], extra=failing)
    with pytest.raises(AssertionError, match="not finished") as err:
        with plat.rollout(NS, APP, "1.1.0") as rollout:
            rollout.revert_timeout = 0.1
            rollout.run(timeout=0.1)
    assert any("could not revert" in n and "forbidden" in n for n in err.value.__notes__)
    # the target went back even though the Canary could not be patched
    assert [p[-1]["value"] for kind, _, p in patches(fakes) if kind == "deployment"] == [
        [*ENV, {"name": "APP_VERSION", "value": "1.1.0"}], ENV]


def test_an_unknown_variable_is_refused_before_anything_changes(tmp_path):
    plat, fakes = make(tmp_path, ROLLED_BACK)
    with pytest.raises(ValueError, match="FAULT_TYPO is not an environment variable"):
        with plat.rollout(NS, APP, "1.1.0", FAULT_TYPO="1") as rollout:
            rollout.run()
    assert not patches(fakes)


def test_without_prometheus_the_observed_values_are_none(tmp_path):
    plat, _ = make(tmp_path, ROLLED_BACK)

    def unreachable():
        raise OSError("connection refused")

    plat.metrics = unreachable
    with plat.rollout(NS, APP, "1.1.0") as rollout:
        rollout.run()
    assert all(p.success_rate is None and p.p99_ms is None for p in rollout.timeline)
    assert rollout.timeline[-1].metrics == {"request-success-rate": None}


def test_flagger_phases_outside_the_shared_ones():
    assert canary_status({"status": {"phase": "WaitingPromotion", "canaryWeight": 20}}).phase is Phase.PROGRESSING
    assert canary_status({}).phase is Phase.INITIALIZED
    with pytest.raises(AssertionError, match="'Bogus'"):
        canary_status({"status": {"phase": "Bogus"}})


def test_the_cluster_backends_offer_rollout_only_where_they_may_change_the_platform(tmp_path):
    assert "rollout" in KindPlatform.capabilities and "rollout" in EksPlatform.capabilities
    plat, _ = make(tmp_path, ROLLED_BACK)
    plat.name = "eks"
    plat.requires("rollout")
    assert isinstance(plat.rollout(NS, APP, "1.1.0"), ClusterRollout)
    plat.destructive = False
    for attempt in (lambda: plat.requires("rollout"), lambda: plat.rollout(NS, APP, "1.1.0")):
        with pytest.raises(MissingCapability, match="--destructive"):
            attempt()


def test_succeeded_with_the_old_spec_on_the_primary_is_an_error(tmp_path):
    plat, _ = make(tmp_path, [*PROMOTED, canary("Succeeded", applied="h2", when="t2")])
    with plat.rollout(NS, APP, "1.1.0") as rollout:
        with pytest.raises(AssertionError, match="Succeeded, but rag-api-primary runs"):
            rollout.run()
