"""Fixtures of the rollout suite: user load through the gateway, and a timeline report per
scenario (JSON, and PNG when matplotlib is installed) next to the run's JUnit XML, else in
``reports/``."""

from __future__ import annotations

import contextlib
import math
import re
from pathlib import Path
from typing import Iterator, Sequence

import pytest

from fixtures.diagnose import client_sends_proxy_header
from fixtures.flagger import Rollout
from fixtures.load import MAX_REQUESTS_PER_USER, LoadRun, LoadSpec, Target
from fixtures.platform import Tenant, user_headers
from fixtures.report import record
from suites.rollout import timeline

REPO = Path(__file__).resolve().parents[2]
WAIT_S = 0.05  # between one user's requests


@pytest.fixture
def user_load(platform, tmp_path: Path):
    """``user_load(tenants, at_most_s)``: a context manager running locust (a subprocess)
    through the gateway with real tokens of each tenant's user, two users per tenant;
    yields the :class:`~fixtures.load.LoadRun`, stopped on exit. Traffic is flowing for
    every tenant when the block starts and keeps flowing until the block stops it (at a
    rollout's verdict), for at most ``at_most_s`` seconds: pass the rollout's own bound, so
    no analysis runs after the users have gone."""
    @contextlib.contextmanager
    def start(tenants: Sequence[Tenant], at_most_s: float) -> Iterator[LoadRun]:
        gw = platform.gateway()
        seconds = math.ceil(at_most_s)
        spec = LoadSpec(gateway=gw.address, ca_bundle=gw.ca_bundle, proxy_protocol=client_sends_proxy_header(gw),
                        targets=[Target(t.name, t.host, user_headers(t, platform.idp(t).token())) for t in tenants],
                        users_per_tenant=2, wait_s=WAIT_S, run_time_s=seconds,
                        # enough requests that the time, not the budget, ends a run
                        max_requests_per_user=min(MAX_REQUESTS_PER_USER, math.ceil(seconds / WAIT_S) + 1))
        with LoadRun(spec, tmp_path / "load", name="users") as run:
            for t in tenants:
                run.wait_for(t.name, 10)
            yield run
    return start


@pytest.fixture
def report(request: pytest.FixtureRequest):
    """``report(rollout, load_records)``: registers the scenario's timeline; written at
    teardown, also when the test failed, to ``<reports>/rollout-<test>.{json,png}``."""
    entries: list[tuple[Rollout, list]] = []
    yield lambda rollout, records: entries.append((rollout, records))
    xml = request.config.getoption("xmlpath", None)
    out = Path(xml).resolve().parent if xml else REPO / "reports"
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", request.node.name).strip("_")
    for i, (rollout, records) in enumerate(entries):
        written = timeline.write(out / f"rollout-{name}{'-' + str(i) if i else ''}", rollout, records)
        record(request.node, "rollout", canary=rollout.spec.ref, version=rollout.version, phase=rollout.status.phase,
               timeline=written[0], png=written[1] if len(written) > 1 else None)
