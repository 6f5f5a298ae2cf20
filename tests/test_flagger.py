"""Flagger's Canary as data (fixtures.flagger) and the subset the standalone engine runs:
parsing with Flagger's defaults, the weight steps, query templating, the blast-radius bound,
and the refusals, each naming the resource and the field. No process is started."""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import pytest

from fixtures.flagger import (BUILTIN_QUERIES, BlastRadius, BlastRadiusBound, CanarySpec, CanarySpecError, Metric,
                              Phase, TimelinePoint, parse_duration, time_to_rollback)
from fixtures.manifests import render
from fixtures.standalone.rollout import check_implemented

PLATFORM = Path(__file__).resolve().parents[1] / "platform"

TEMPLATE = {"metadata": {"namespace": "t", "name": "lat"},
            "spec": {"provider": {"type": "prometheus", "address": "http://prometheus:9090"},
                     "query": 'histogram_quantile(0.99, sum(rate(x{ns="{{ namespace }}",w=~"{{ target }}"}'
                              '[{{ interval }}])) by (le)) + {{ variables.offset }}'}}


def canary(**analysis: Any) -> dict:
    base = {"interval": "5s", "threshold": 3, "maxWeight": 50, "stepWeight": 10,
            "metrics": [{"name": "request-success-rate", "thresholdRange": {"min": 99}, "interval": "10s"}],
            "webhooks": [{"name": "acceptance", "type": "pre-rollout", "url": "http://flagger-loadtester.test/",
                          "timeout": "30s", "metadata": {"type": "bash", "cmd": "curl -sf http://app-canary.t.svc:80/readyz"}}]}
    base.update(analysis)
    return {"metadata": {"namespace": "t", "name": "app"},
            "spec": {"targetRef": {"name": "app"}, "service": {"port": 80}, "analysis": {k: v for k, v in base.items() if v is not None}}}


# -- durations -------------------------------------------------------------------------

@pytest.mark.parametrize("text,seconds", [("5s", 5), ("1m", 60), ("1m30s", 90), ("2h", 7200)])
def test_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "5", "1.5s", "m", "5 s", None])
def test_bad_duration_is_refused(text: Any) -> None:
    with pytest.raises(CanarySpecError, match="is not a duration"):
        parse_duration(text, "Canary t/app", "spec.analysis.interval")


# -- steps and defaults ------------------------------------------------------------------

@dataclass(frozen=True)
class Steps:
    analysis: dict
    steps: tuple[int, ...]
    max_weight: int

    def __str__(self) -> str:
        return f"{self.analysis} steps through {self.steps}"


STEPS = [
    Steps({"stepWeight": 10, "maxWeight": 50}, (10, 20, 30, 40, 50), 50),
    Steps({"stepWeight": 20, "maxWeight": 50}, (20, 40, 50), 50),            # the last step is capped
    Steps({"stepWeight": 25, "maxWeight": None}, (25, 50, 75, 100), 100),     # Flagger's default maxWeight
    Steps({"stepWeights": [1, 5, 25, 50], "stepWeight": None, "maxWeight": 80}, (1, 5, 25, 50), 50),
]


@pytest.mark.parametrize("case", STEPS, ids=str)
def test_weight_steps(case: Steps) -> None:
    spec = CanarySpec.from_resources(canary(**case.analysis))
    assert (spec.steps, spec.max_weight) == (case.steps, case.max_weight)
    assert [spec.next_weight(w) for w in (0,) + case.steps[:-1]] == list(case.steps)
    assert spec.next_weight(case.steps[-1]) == case.max_weight


def test_flagger_defaults() -> None:
    doc = canary(threshold=None, interval=None)
    spec = CanarySpec.from_resources(doc)
    assert (spec.threshold, spec.interval_s, spec.progress_deadline_s) == (1, 60.0, 600.0)


def test_durations_follow_the_spec() -> None:
    spec = CanarySpec.from_resources(canary())
    assert spec.intervals_to_promote == 5 + 3
    assert spec.intervals_to_roll_back == 3 + 1
    assert spec.max_duration_s() == 600 + 5 * (8 + 1)


# -- refusals ---------------------------------------------------------------------------

@dataclass(frozen=True)
class Refusal:
    what: str
    change: Callable[[dict], None]
    path: str
    detail: str

    def __str__(self) -> str:
        return f"{self.what} is refused at {self.path}"


def _set(path: list, value: Any) -> Callable[[dict], None]:
    def change(doc: dict) -> None:
        node = doc
        for key in path[:-1]:
            node = node[key]
        node[path[-1]] = value
    return change


A = ["spec", "analysis"]
REFUSALS = [
    Refusal("a misspelt analysis field", _set(A + ["stepweight"], 5), "spec.analysis.stepweight", "not a field"),
    Refusal("an inline metric query", _set(A + ["metrics", 0, "query"], "up"), "spec.analysis.metrics[0].query",
            "deprecated"),
    Refusal("an unknown built-in metric", _set(A + ["metrics", 0, "name"], "error-rate"),
            "spec.analysis.metrics[0].name", "not a built-in metric"),
    Refusal("a missing MetricTemplate", _set(A + ["metrics", 0, "templateRef"], {"name": "nope"}),
            "spec.analysis.metrics[0].templateRef", "MetricTemplate t/nope not found"),
    Refusal("an unknown webhook type", _set(A + ["webhooks", 0, "type"], "pre"), "spec.analysis.webhooks[0].type",
            "not a Flagger webhook type"),
    Refusal("stepWeights that do not rise", _set(A + ["stepWeights"], [10, 5]), "spec.analysis.stepWeights",
            "must rise"),
    Refusal("a stepWeight of zero", _set(A + ["stepWeight"], 0), "spec.analysis.stepWeight", "within 1..100"),
]


@pytest.mark.parametrize("case", REFUSALS, ids=str)
def test_canary_refusal_names_resource_and_field(case: Refusal) -> None:
    doc = canary()
    case.change(doc)
    with pytest.raises(CanarySpecError) as err:
        CanarySpec.from_resources(doc)
    assert (err.value.resource, err.value.path) == ("Canary t/app", case.path)
    assert case.detail in err.value.detail


def test_template_of_another_provider_is_refused() -> None:
    tpl = copy.deepcopy(TEMPLATE)
    tpl["spec"]["provider"]["type"] = "datadog"
    doc = canary(metrics=[{"name": "lat", "templateRef": {"name": "lat"}, "thresholdRange": {"max": 5}}])
    with pytest.raises(CanarySpecError, match="MetricTemplate t/lat: spec.provider.type: 'datadog'"):
        CanarySpec.from_resources(doc, [tpl])


# -- queries ----------------------------------------------------------------------------

def test_builtin_query_is_flaggers_with_the_canary_filled_in() -> None:
    spec = CanarySpec.from_resources(canary())
    [m] = spec.metrics
    q = spec.query(m)
    assert q == (BUILTIN_QUERIES["request-success-rate"].replace("{{ namespace }}", "t")
                 .replace("{{ target }}", "app").replace("{{ interval }}", "10s"))
    assert "{{" not in q and 'destination_workload=~"app"' in q and "[10s]" in q


def test_template_query_gets_flaggers_variables() -> None:
    doc = canary(metrics=[{"name": "lat", "templateRef": {"name": "lat"}, "thresholdRange": {"max": 5},
                           "interval": "30s", "templateVariables": {"offset": "1"}}])
    spec = CanarySpec.from_resources(doc, [TEMPLATE])
    [m] = spec.metrics
    assert m.template == "t/lat"
    assert spec.query(m) == 'histogram_quantile(0.99, sum(rate(x{ns="t",w=~"app"}[30s])) by (le)) + 1'


def test_unknown_template_variable_is_refused() -> None:
    tpl = copy.deepcopy(TEMPLATE)
    tpl["spec"]["query"] = 'up{pod="{{ pod }}"}'
    spec = CanarySpec.from_resources(canary(metrics=[{"name": "x", "templateRef": {"name": "lat"}}]), [tpl])
    with pytest.raises(CanarySpecError, match=r"\{\{ pod \}\} is not one Flagger defines"):
        spec.query(spec.metrics[0])


@pytest.mark.parametrize("value,ok", [(None, False), (math.nan, False), (98.9, False), (99.0, True), (100.0, True)])
def test_no_value_or_nan_is_a_failed_check(value: float | None, ok: bool) -> None:
    assert Metric("request-success-rate", "1m", "q", min=99).passes(value) is ok


def test_max_is_inclusive() -> None:
    m = Metric("latency", "1m", "q", max=500)
    assert m.passes(500.0) and not m.passes(500.1)


# -- blast radius and time to rollback -------------------------------------------------------

def test_bound_is_the_second_step_for_threshold_plus_two_intervals() -> None:
    bound = BlastRadiusBound.of(CanarySpec.from_resources(canary()))
    assert (bound.share, bound.intervals, bound.ceiling) == (0.20, 3 + 2, 0.50)
    bound = BlastRadiusBound.of(CanarySpec.from_resources(canary(stepWeights=[2, 20, 30], stepWeight=None)))
    assert (bound.share, bound.ceiling) == (0.20, 0.30)
    assert "at most 20% of requests" in bound.explanation


def test_a_single_step_bounds_nothing() -> None:
    # The one analysis allowed to pass is at maxWeight: the version is promoted.
    bound = BlastRadiusBound.of(CanarySpec.from_resources(canary(stepWeight=50, maxWeight=50)))
    assert bound.share == 1.0


def test_blast_radius_share() -> None:
    assert BlastRadius(3, 300).share == 0.01
    assert BlastRadius(0, 0).share == 0.0


def test_time_to_rollback_counts_from_first_traffic() -> None:
    tl = [TimelinePoint(0, Phase.PROGRESSING, 0, 0), TimelinePoint(5, Phase.PROGRESSING, 10, 0),
          TimelinePoint(10, Phase.PROGRESSING, 10, 1), TimelinePoint(15, Phase.FAILED, 0, 1)]
    assert time_to_rollback(tl, 5.0) == (10, 2.0)
    assert time_to_rollback(tl[:1] + tl[-1:], 5.0) is None  # never had traffic


# -- what the standalone engine runs ------------------------------------------------------------

def test_the_platforms_canaries_are_implemented_by_the_engine() -> None:
    docs = render(PLATFORM, "standalone")
    templates = [d for d in docs if d["kind"] == "MetricTemplate"]
    canaries = [d for d in docs if d["kind"] == "Canary"]
    assert canaries
    for doc in canaries:
        check_implemented(CanarySpec.from_resources(doc, templates))


ENGINE_REFUSALS = [
    Refusal("an iterations (blue/green) analysis", _set(A + ["iterations"], 5), "spec.analysis.iterations",
            "not implemented by the standalone rollout engine"),
    Refusal("traffic mirroring", _set(A + ["mirror"], True), "spec.analysis.mirror", "not implemented"),
    Refusal("a post-rollout webhook", _set(A + ["webhooks", 0, "type"], "post-rollout"),
            "spec.analysis.webhooks[0].type", "'post-rollout' webhooks are not implemented"),
    Refusal("a webhook to another service", _set(A + ["webhooks", 0, "url"], "http://gate.t/approve"),
            "spec.analysis.webhooks[0].url", "only Flagger's loadtester is emulated"),
    Refusal("a loadtester command other than curl", _set(A + ["webhooks", 0, "metadata"],
                                                          {"type": "bash", "cmd": "hey -z 1m http://app.t/"}),
            "spec.analysis.webhooks[0].metadata", "curl -sf <url>"),
    Refusal("a curl to an address outside the mesh", _set(A + ["webhooks", 0, "metadata"],
                                                           {"type": "bash", "cmd": "curl -sf http://example.org/"}),
            "spec.analysis.webhooks[0].metadata.cmd", "does not name a mesh service"),
]


@pytest.mark.parametrize("case", ENGINE_REFUSALS, ids=str)
def test_engine_refuses_what_it_does_not_implement(case: Refusal) -> None:
    doc = canary()
    case.change(doc)
    spec = CanarySpec.from_resources(doc)  # valid Flagger
    with pytest.raises(CanarySpecError) as err:
        check_implemented(spec)
    assert (err.value.resource, err.value.path) == ("Canary t/app", case.path)
    assert case.detail in err.value.detail


def test_a_canary_the_engine_cannot_run_is_refused_when_the_platform_loads(tmp_path: Path) -> None:
    import shutil

    from fixtures.standalone.mesh import load_mesh
    from fixtures.standalone.subset import UnsupportedField

    copy = tmp_path / "platform"
    shutil.copytree(PLATFORM, copy, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    kustomization = copy / "tenants/tenanta/kustomization.yaml"
    assert "patches:" not in kustomization.read_text(), "tenanta's kustomization has patches already"
    kustomization.write_text(kustomization.read_text() + (
        "patches:\n"
        "  - target: {group: flagger.app, kind: Canary, name: rag-api}\n"
        "    patch: |-\n"
        "      - op: add\n"
        "        path: /spec/analysis/webhooks/-\n"
        "        value: {name: gate, type: confirm-promotion, url: http://flagger-loadtester.flagger-system/gate/approve}\n"))
    with pytest.raises(UnsupportedField) as err:
        load_mesh(render(copy, "standalone"))
    assert (err.value.resource, err.value.path) == ("Canary tenanta/rag-api", "spec.analysis.webhooks[1].type")
    assert "'confirm-promotion' webhooks are not implemented" in err.value.detail
