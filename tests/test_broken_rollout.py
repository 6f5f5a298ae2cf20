"""The rollout suite fails on a platform whose Canary would let a bad version through.

A copy of the platform whose tenanta Canary accepts a success rate far below what a 20%
5xx version reaches would promote that version; the suite's 5xx scenario, run against the
copy, must fail and say so. The same scenario against an intact copy passes (the control).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from fixtures.flagger import canary_for
from fixtures.manifests import render
from fixtures.mutants.catalog import add_patch, copy_platform
from fixtures.mutants.runner import run_pytest

pytestmark = pytest.mark.slow

TENANTA_KUSTOMIZATION = "tenants/tenanta/kustomization.yaml"
SCENARIO = "suites/rollout/test_canary_scenarios.py"
FIVE_XX = "test_canary_rollout and 5xx"
LOOSENED_MIN = 50  # far below the 80% a 20% 5xx version answers

LOOSEN = {"target": {"group": "flagger.app", "kind": "Canary", "name": "rag-api"}, "patch": f"""- op: replace
  path: /spec/analysis/metrics/0/thresholdRange/min
  value: {LOOSENED_MIN}
"""}


def loosen(copy: Path) -> None:
    add_patch(copy, TENANTA_KUSTOMIZATION, LOOSEN)


@dataclass(frozen=True)
class Variant:
    name: str
    mutate: Callable[[Path], None] | None
    success_rate_min: float | None   # None: as the platform has it
    suite_passes: bool

    def __str__(self) -> str:
        return f"{self.name}: the 5xx scenario {'passes' if self.suite_passes else 'fails'}"


VARIANTS = [
    Variant("the platform as it is", None, None, True),
    Variant(f"a Canary accepting a {LOOSENED_MIN}% success rate", loosen, LOOSENED_MIN, False),
]


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_rollout_suite_against_the_copy(variant: Variant, tmp_path: Path) -> None:
    copy = copy_platform(tmp_path)
    if variant.mutate is not None:
        variant.mutate(copy)
    spec = canary_for(render(copy, "standalone"), "tenanta", "rag-api")
    [success] = [m for m in spec.metrics if m.name == "request-success-rate"]
    if variant.success_rate_min is not None:
        assert success.min == variant.success_rate_min, "the patch did not reach tenanta's Canary"
    else:
        assert success.min is not None and success.min > 80, f"the platform's Canary accepts {success.range} already"

    run = run_pytest([SCENARIO, "-k", FIVE_XX], platform_dir=copy, work=tmp_path / "run", timeout=400)
    assert run.report is not None, f"exit {run.returncode}:\n{run.output[-4000:]}"
    if variant.suite_passes:
        assert run.returncode == 0, f"exit {run.returncode}:\n{run.output[-4000:]}"
        assert len(run.report.passed) == 1 and not run.report.failed, run.output[-4000:]
    else:
        assert run.returncode == 1, f"exit {run.returncode}:\n{run.output[-4000:]}"
        [failure] = run.report.failed.values()
        # It failed for the right reason: the bad version was promoted.
        assert "phase=Succeeded" in failure and "Phase.FAILED" in failure, failure[-4000:]
    assert not run.leftovers, "the run left its run directory behind"
