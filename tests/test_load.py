"""fixtures/load.py and fixtures/locustfile.py: locust runs in a subprocess, bounded in users,
requests and time, against loopback only; every request becomes a record with the identity
the platform answered with; the summaries are plain arithmetic over those records."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import certifi
import pytest

from fixtures.load import (LOCUSTFILE, LoadRun, LoadSpec, Record, Target, foreign_identities, percentile,
                           summarize)
from fixtures.platform import user_headers

REPO = Path(__file__).resolve().parents[1]
CA = Path(certifi.where())  # a readable CA bundle; these runs never complete a handshake


def rec(t: float, tenant: str = "a", status: int | None = 200, ms: float = 10.0, seen: str | None = "same",
        claim: str | None = "same") -> Record:
    return Record(t, tenant, status, ms, None, tenant if seen == "same" else seen,
                  tenant if claim == "same" else claim, None)


def test_percentile_is_nearest_rank():
    values = list(range(1, 101))  # 1..100
    assert percentile(values, 50) == 50
    assert percentile(values, 99) == 99
    assert percentile(values, 100) == 100
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 99))


def test_summarize_counts_errors_and_latency_per_tenant_and_window():
    records = [rec(1, ms=5), rec(2, ms=15), rec(3, status=503, ms=1), rec(4, status=None, ms=2),
               rec(2.5, tenant="b", ms=100)]
    whole = summarize(records, "a")
    assert (whole.count, whole.errors, whole.statuses) == (4, 2, {"200": 2, "503": 1, "no response": 1})
    assert whole.error_rate == 0.5
    window = summarize(records, "a", start=1, end=3, window="w")
    assert (window.count, window.errors, window.p99_ms) == (2, 0, 15)
    assert "a w: 2 requests, 0 errors" in str(window)
    assert summarize(records, "b").p50_ms == 100


def test_foreign_identities_are_answers_carrying_another_tenant():
    own = rec(1)
    wrong_workload = rec(2, seen="b")
    wrong_claim = rec(3, claim="b")
    failed = rec(4, status=503, seen=None, claim=None)  # no answer, no identity
    assert foreign_identities([own, wrong_workload, wrong_claim, failed]) == [wrong_workload, wrong_claim]


@pytest.mark.parametrize("change,message", [
    (dict(gateway=("10.0.0.1", 443)), "loopback only"),
    (dict(users_per_tenant=0), "users_per_tenant"),
    (dict(users_per_tenant=1000), "users_per_tenant"),
    (dict(run_time_s=7200), "run_time_s"),
    (dict(max_requests_per_user=10**9), "max_requests_per_user"),
    (dict(targets=[]), "at least one target"),
], ids=["remote gateway", "no users", "too many users", "too long", "unbounded requests", "no target"])
def test_spec_refuses_unbounded_or_remote_runs(change, message):
    kwargs = dict(gateway=("127.0.0.1", 1), ca_bundle=CA, proxy_protocol=False,
                  targets=[Target("a", "a.example.com", {})])
    with pytest.raises(ValueError, match=message):
        LoadSpec(**{**kwargs, **change})


def test_spec_allows_load_until_the_verdict_of_a_production_timed_rollout():
    # a Canary with the base's timing (1m interval, 600 s deadline) may take ~30 min
    spec = LoadSpec(("127.0.0.1", 1), CA, False, [Target("a", "a.example.com", {})], run_time_s=1800,
                    max_requests_per_user=math.ceil(1800 / 0.05))
    assert spec.run_time_s == 1800


def test_a_run_whose_harness_is_gone_ends_by_itself(tmp_path):
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()

    class Orphaned(LoadRun):  # as if the process that started it had died
        def _config(self) -> dict:
            return {**super()._config(), "parent_pid": gone.pid}

    spec = LoadSpec(("127.0.0.1", 9), CA, False, [Target("a", "a.example.com", {})], users_per_tenant=1,
                    wait_s=0.5, run_time_s=120)
    with Orphaned(spec, tmp_path, "orphaned") as run:
        run.finish(timeout=45)  # exit status 0, long before its run time
    assert "Traceback" not in run.log()


def test_locustfile_refuses_a_remote_gateway_by_itself(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"gateway": ["192.0.2.1", 443], "ca_bundle": str(CA), "proxy_protocol": False,
                                  "records": str(tmp_path / "r.jsonl"), "users_per_tenant": 1, "wait_s": 0,
                                  "max_requests_per_user": 1, "timeout_s": 1, "tenants": []}))
    proc = subprocess.run([sys.executable, "-m", "locust", "-f", str(LOCUSTFILE), "--headless", "-t", "1s"],
                          env={**os.environ, "LOAD_CONFIG": str(config), "PYTHONPATH": str(REPO)},
                          capture_output=True, text=True, timeout=60, cwd=tmp_path, check=False)
    assert proc.returncode != 0
    assert "loopback only" in proc.stdout + proc.stderr


def test_bounded_run_records_every_request_with_the_identity_seen(platform, tmp_path):
    gw = platform.gateway()
    targets = [Target(t.name, t.host, user_headers(t, platform.idp(t).token())) for t in platform.tenants]
    spec = LoadSpec(gw.address, gw.ca_bundle, gw.expects_proxy_protocol, targets, users_per_tenant=2, wait_s=0,
                    max_requests_per_user=5, run_time_s=30)
    with LoadRun(spec, tmp_path, "bounded") as run:
        records = run.finish(timeout=25)  # ends when every user spent its 5 requests, not at 30 s
        pid = run.proc.pid
    for t in platform.tenants:
        mine = [r for r in records if r.tenant == t.name]
        assert len(mine) == 2 * 5, [str(summarize(records, x.name)) for x in platform.tenants]
        assert all(r.ok and r.seen_tenant == t.name and r.seen_claim == t.name for r in mine), mine
        assert all(r.seen_peer and r.seen_peer.endswith("/sa/istio-ingressgateway") for r in mine), mine
    assert not foreign_identities(records)
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)  # the process group is gone


def test_stop_ends_a_running_load_and_its_group(tmp_path):
    spec = LoadSpec(("127.0.0.1", 9), CA, False, [Target("a", "a.example.com", {})], users_per_tenant=1,
                    wait_s=0.5, run_time_s=60)
    run = LoadRun(spec, tmp_path, "stopped").start()
    try:
        assert run.running()
    finally:
        run.stop()
    assert not run.running()
    with pytest.raises(ProcessLookupError):
        os.killpg(run.proc.pid, 0)
