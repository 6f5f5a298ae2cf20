"""Canaries under load, promoted or rolled back by the platform's own Canary.

Each row rolls a new version of a tenant's rag-api out while that tenant's users call it
through the gateway (locust, real tokens), and asserts the phase the rollout ends in, the
version the primary serves afterwards, and the blast radius: the share of user requests
that failed during the rollout, within the bound the Canary's spec implies
(``fixtures.flagger.BlastRadiusBound``). Nothing here names an interval, a weight or a
threshold: they all come from the Canary. Every rollout is put back when its block ends.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Callable, Mapping, Sequence

import pytest

from fixtures.flagger import (BlastRadius, BlastRadiusBound, CanarySpec, Phase, Rollout, canary_for, first_traffic,
                              time_to_rollback)
from fixtures.load import Record
from fixtures.platform import MissingCapability, Outcome, Tenant, user_headers

pytestmark = [pytest.mark.standalone_required, pytest.mark.slow]

APP = "rag-api"
# The platform's promise, whatever a Canary's own spec says: a version failing its analyses
# never gets more than this share (percent) of a tenant's traffic.
MAX_FAILING_WEIGHT = 20


def slower_than_the_latency_limit(spec: CanarySpec) -> dict[str, str]:
    """Every request a fifth slower than the Canary's p99 limit. Not "500 ms slower": on an
    app answering in about a millisecond that lands on Istio's 500 ms bucket bound, and
    Envoy records whole milliseconds, so p99 reads 497.5 in many intervals and passes a
    500 ms limit (tests/test_rollout_rules.py shows it). 1.2 x a bound is never a bound."""
    limits = [m.max for m in spec.metrics if m.max is not None and "istio_request_duration" in m.query]
    if not limits:
        pytest.fail(f"{spec.ref} has no latency metric with a maximum: nothing to be slower than")
    return {"FAULT_LATENCY_MS": str(round(min(limits) * 1.2))}


@dataclass(frozen=True)
class Scenario:
    what: str                                  # the new version, in words
    tag: str                                   # suffix of its version string
    env: Mapping[str, str] | Callable[[CanarySpec], Mapping[str, str]] = field(default_factory=dict)
    expect: Phase = Phase.FAILED
    load: bool = True
    fault: str | None = None
    fails_every_analysis: bool = True          # but the first: the premise of BlastRadiusBound
    never_ready: bool = False

    def __str__(self) -> str:
        if self.expect is Phase.SUCCEEDED:
            return f"{self.what} is promoted with zero failed requests"
        return f"{self.what} is {'never sent traffic' if self.never_ready else 'rolled back'}"


SCENARIOS = [
    Scenario("a healthy version", "healthy", expect=Phase.SUCCEEDED, fails_every_analysis=False),
    Scenario("a version answering 20% 5xx", "5xx", {"FAULT_ERROR_RATE": "0.2"}),
    Scenario("a version slower than the Canary's p99 limit", "slow", slower_than_the_latency_limit),
    Scenario("a version that crashes on start", "crash", {"FAULT_CRASH_ON_START": "true"}, never_ready=True),
    Scenario("a healthy version with no traffic (no metric value)", "idle", load=False),
    Scenario("a healthy version while Prometheus is unreachable", "blind", fault="prometheus-unreachable"),
]


def primary_version(platform, tenant: Tenant) -> str:
    """The version users are served, asked through the gateway (all traffic is the
    primary's when no rollout is in progress)."""
    __tracebackhide__ = True
    headers = user_headers(tenant, platform.idp(tenant).token())
    seen = {platform.gateway().request(tenant.host, "/api/whoami", headers=headers).expect(Outcome.OK).json()["version"]
            for _ in range(5)}
    assert len(seen) == 1, f"{tenant}: more than one version serves with no rollout running: {seen}"
    return seen.pop()


def verdict_within(spec: CanarySpec) -> float:
    """How long a rollout of ``spec`` may take to its verdict: the longest rollout the
    Canary allows, half again, one interval for the controller to notice the revision and
    30 s. The run is bounded by it and the users' load may last as long, so users call
    until the verdict on every backend."""
    return spec.max_duration_s() * 1.5 + spec.interval_s + 30


def fault_or_skip(platform, name: str | None) -> contextlib.AbstractContextManager:
    """The fault ``name`` (not yet entered), or a skip naming it when the backend has none."""
    if name is None:
        return contextlib.nullcontext()
    try:
        return platform.fault(name)
    except MissingCapability as exc:
        pytest.skip(str(exc))


def canary_requests(platform, spec: CanarySpec) -> float:
    """Requests the canary workload has answered, by Istio's standard metric."""
    result = platform.metrics().query(
        f'sum(istio_requests_total{{reporter="destination",destination_workload_namespace="{spec.namespace}",'
        f'destination_workload="{spec.target}"}})')
    return float(result[0]["value"][1]) if result else 0.0


def during(records: Sequence[Record], rollout: Rollout, tenant: Tenant) -> list[Record]:
    return [r for r in records if r.tenant == tenant.name and rollout.started_at <= r.t <= rollout.finished_at]


def describe(rollout: Rollout) -> str:
    return "\n".join(f"  {p.t:6.1f}s {p.phase!s:<12} weight={p.weight:<3} failedChecks={p.failed_checks} "
                     f"{dict(p.metrics)} {p.note}" for p in rollout.timeline)


@pytest.mark.parametrize("case", SCENARIOS, ids=str)
def test_canary_rollout(platform, requires, user_load, report, case: Scenario) -> None:
    requires("rollout")
    fault = fault_or_skip(platform, case.fault)  # before any load starts
    tenant = platform.tenants[0]
    before = primary_version(platform, tenant)
    version = f"{before}-{case.tag}"
    env = case.env(canary_for(platform.manifests(), tenant.namespace, APP)) if callable(case.env) else case.env
    with contextlib.ExitStack() as stack:
        rollout = stack.enter_context(platform.rollout(tenant, APP, version, **env))
        bound = BlastRadiusBound.of(rollout.spec)
        until = verdict_within(rollout.spec)
        load = stack.enter_context(user_load([tenant], until)) if case.load else None
        served_before = canary_requests(platform, rollout.spec)
        with fault:
            try:
                status = rollout.run(timeout=until)
            finally:
                records = load.records() if load else []
                report(rollout, records)
        if load:
            load.stop()
        story = f"{rollout.spec.ref} -> {version}: {status}\n{describe(rollout)}"
        assert status.phase is case.expect, story
        assert primary_version(platform, tenant) == (version if case.expect is Phase.SUCCEEDED else before), story
        served = canary_requests(platform, rollout.spec) - served_before

        blast = BlastRadius(sum(1 for r in during(records, rollout, tenant) if not r.ok),
                            len(during(records, rollout, tenant)))
        if case.load:
            assert blast.total > 0, f"no user request during the rollout\n{story}"
        if case.expect is Phase.SUCCEEDED:
            assert blast.failed == 0, f"{blast} while promoting a healthy version\n{story}"
        assert blast.share <= bound.share, f"blast radius {blast} exceeds {bound.explanation}\n{story}"

        if case.never_ready:
            assert first_traffic(rollout.timeline) is None, story
            assert served == 0, f"the canary that never became ready answered {served:g} requests\n{story}"
        elif case.fails_every_analysis:
            seconds, intervals = time_to_rollback(rollout.timeline, rollout.spec.interval_s)
            assert intervals <= bound.intervals + 0.5, (
                f"first traffic to rollback took {seconds:.1f}s = {intervals:.1f} intervals; "
                f"{bound.explanation}\n{story}")
            reached = max(p.weight for p in rollout.timeline)
            assert reached <= bound.share * 100, story
            assert reached <= MAX_FAILING_WEIGHT, (
                f"a failing version reached {reached}% of {tenant}'s traffic; the platform allows at most "
                f"{MAX_FAILING_WEIGHT}%\n{story}")
    assert primary_version(platform, tenant) == before, "leaving the rollout did not put the primary back"


def test_rollback_in_one_tenant_leaves_the_others_untouched(platform, requires, user_load, report) -> None:
    requires("rollout")
    if len(platform.tenants) < 2:
        pytest.fail("the tenant catalog has one tenant: nothing to compare a rollback against")
    bad, *others = platform.tenants
    before = {t.name: primary_version(platform, t) for t in platform.tenants}
    version = f"{before[bad.name]}-5xx"
    with platform.rollout(bad, APP, version, FAULT_ERROR_RATE="0.2") as rollout:
        bound = BlastRadiusBound.of(rollout.spec)
        idle = {t.name: canary_for(platform.manifests(), t.namespace, APP) for t in others}
        served_before = {t.name: canary_requests(platform, idle[t.name]) for t in others}
        until = verdict_within(rollout.spec)
        with user_load(platform.tenants, until) as load:
            try:
                status = rollout.run(timeout=until)
            finally:
                records = load.records()
                report(rollout, records)
        story = f"{rollout.spec.ref} -> {version}: {status}\n{describe(rollout)}"
        assert status.phase is Phase.FAILED, story
        bad_requests = during(records, rollout, bad)
        blast = BlastRadius(sum(1 for r in bad_requests if not r.ok), len(bad_requests))
        assert 0 < blast.failed and blast.share <= bound.share, f"{bad}: {blast}; {bound.explanation}\n{story}"
        for t in others:
            mine = during(records, rollout, t)
            assert mine, f"{t}: no request during the rollout in {bad}"
            failed = [r for r in mine if not r.ok]
            assert not failed, f"{t}: {len(failed)}/{len(mine)} requests failed during {bad}'s rollback: {failed[:3]}"
            foreign = [r for r in mine if r.seen_tenant != t.name]
            assert not foreign, f"{t}: answered by another tenant: {foreign[:3]}"
            assert canary_requests(platform, idle[t.name]) == served_before[t.name], f"{t}: its canary got traffic"
            assert primary_version(platform, t) == before[t.name]
