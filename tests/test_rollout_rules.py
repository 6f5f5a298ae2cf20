"""The recording rules that give the standalone mesh Istio's standard metrics, tested with
``promtool``: the rules' own unit tests, then the queries canary analysis really runs
(Flagger's built-in ones and the platform's MetricTemplate, rendered from the repository's
Canary exactly as the engine renders them) over the same Envoy series."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from fixtures.flagger import BUILTIN_QUERIES, CanarySpec, Metric
from fixtures.manifests import render
from fixtures.standalone.backend import ISTIO_RULES

RULES_DIR = ISTIO_RULES.parent
RULE_TESTS = RULES_DIR / "istio-metrics.rules.test.yml"
PLATFORM = Path(__file__).resolve().parents[1] / "platform"

# The input series of RULE_TESTS, over any 10 s window: the canary (tenanta/rag-api)
# answers 8 requests/s with 200 and 2/s with 500, every one in the (500, 1000] ms bucket.
EXPECTED = {
    "request-success-rate": 80.0,
    "request-duration": 995.0,   # histogram_quantile: 500 + 0.99 * (1000 - 500)
}


def promtool() -> str:
    found = shutil.which("promtool") or ("/usr/bin/promtool" if Path("/usr/bin/promtool").exists() else None)
    if not found:
        pytest.fail("promtool not found: install Debian's prometheus package (make system-deps)")
    return found


def run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([promtool(), *args], cwd=cwd, capture_output=True, text=True, timeout=60, check=False)


def test_rules_are_valid() -> None:
    res = run("check", "rules", ISTIO_RULES.name, cwd=RULES_DIR)
    assert res.returncode == 0, res.stdout + res.stderr


def test_rules_unit_tests_pass() -> None:
    res = run("test", "rules", RULE_TESTS.name, cwd=RULES_DIR)
    assert res.returncode == 0, res.stdout + res.stderr


def test_a_failing_expectation_fails_promtool(tmp_path: Path) -> None:
    # Control for the tests here: promtool does report a wrong expected value.
    doc = yaml.safe_load(RULE_TESTS.read_text())
    doc["rule_files"] = [str(ISTIO_RULES)]
    doc["tests"][0]["promql_expr_test"][0]["exp_samples"][0]["value"] = 161
    path = tmp_path / "wrong.test.yml"
    path.write_text(yaml.safe_dump(doc))
    res = run("test", "rules", str(path), cwd=tmp_path)
    assert res.returncode != 0 and "FAILED" in res.stdout + res.stderr, res.stdout + res.stderr


def canary_specs() -> list[CanarySpec]:
    docs = render(PLATFORM, "standalone")
    templates = [d for d in docs if d["kind"] == "MetricTemplate"]
    return [CanarySpec.from_resources(d, templates) for d in docs if d["kind"] == "Canary"]


def _expected(metric: Metric) -> float:
    """What the metric's query must answer on RULE_TESTS' series. A MetricTemplate is
    recognised by what it computes (the platform's latency-p99 is Flagger's request-duration)."""
    if metric.template is None:
        return EXPECTED[metric.name]
    query = "".join(metric.query.split())
    if query.startswith("histogram_quantile(0.99,") and "istio_request_duration_milliseconds_bucket" in query:
        return EXPECTED["request-duration"]
    if "istio_requests_total" in query and 'response_code!~"5.*"' in query:
        return EXPECTED["request-success-rate"]
    raise AssertionError(f"no expected value for MetricTemplate {metric.template}; add one to EXPECTED")


@pytest.mark.parametrize("spec", canary_specs(), ids=lambda s: s.ref)
def test_canary_queries_evaluate_on_recorded_istio_metrics(spec: CanarySpec, tmp_path: Path) -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    test = doc["tests"][0]
    for s in test["input_series"]:
        s["series"] = s["series"].replace('namespace="tenanta"', f'namespace="{spec.namespace}"')
    cases = []
    metrics = list(spec.metrics) + [Metric(name=n, interval=spec.metrics[0].interval, query=q)
                                    for n, q in BUILTIN_QUERIES.items()]
    for m in metrics:
        cases.append({"expr": spec.query(m), "eval_time": "20s",
                      "exp_samples": [{"labels": "{}", "value": _expected(m)}]})
        # No traffic: the query has no value (Flagger: a failed check).
        idle = spec.query(m).replace(f'"{spec.target}"', '"no-such-workload"')
        cases.append({"expr": idle, "eval_time": "20s", "exp_samples": []})
    generated = {"rule_files": [str(ISTIO_RULES)], "evaluation_interval": doc["evaluation_interval"],
                 "tests": [{"interval": test["interval"], "input_series": test["input_series"],
                            "promql_expr_test": cases}]}
    path = tmp_path / "canary-queries.test.yml"
    path.write_text(yaml.safe_dump(generated, sort_keys=False))
    res = run("test", "rules", str(path), cwd=tmp_path)
    assert res.returncode == 0, f"{res.stdout}{res.stderr}\nqueries:\n" + "\n".join(c["expr"] for c in cases)


def test_requests_recorded_at_a_bucket_bound_read_below_it(tmp_path: Path) -> None:
    """Why the rollout suite's slow version is not "500 ms slower": Envoy records whole
    milliseconds, so a request of 500.x ms lands in the le="500" bucket, and p99 of a
    version whose requests all take just over 500 ms reads 497.5, passing a 500 ms limit."""
    labels = ('cluster_name="inbound|8080||",namespace="t",proxy_type="sidecar",workload="slow"')
    series = [{"series": f'envoy_cluster_upstream_rq_time_bucket{{{labels},le="{le}"}}', "values": values}
              for le, values in (("250", "0x30"), ("500", "0+10x30"), ("1000", "0+10x30"), ("+Inf", "0+10x30"))]
    query = Metric(name="request-duration", interval="10s", query=BUILTIN_QUERIES["request-duration"])
    spec = CanarySpec(namespace="t", name="slow", target="slow", port=80, progress_deadline_s=60, interval_s=5,
                      threshold=1, max_weight=50, steps=(50,), metrics=(query,), webhooks=())
    generated = {"rule_files": [str(ISTIO_RULES)], "evaluation_interval": "1s", "tests": [{
        "interval": "1s", "input_series": series,
        "promql_expr_test": [{"expr": spec.query(query), "eval_time": "20s",
                              "exp_samples": [{"labels": "{}", "value": 497.5}]}]}]}
    path = tmp_path / "boundary.test.yml"
    path.write_text(yaml.safe_dump(generated, sort_keys=False))
    res = run("test", "rules", str(path), cwd=tmp_path)
    assert res.returncode == 0, res.stdout + res.stderr
    assert Metric("latency-p99", "10s", "", max=500).passes(497.5)
