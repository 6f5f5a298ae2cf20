"""A deliberately broken copy of the platform either changes behaviour or fails with a
clear error; it is never silently run as if it were intact.

* Deleting tenanta's AuthorizationPolicy (the namespace-wide ALLOW rule) opens tenanta's
  rag-api to calls with no token, while tenantb, untouched, still refuses them.
* A field the standalone backend does not implement makes a suite run with
  ``--platform-dir`` fail, naming the resource and the field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

from fixtures.process import pid_alive

from fixtures.manifests import render
from fixtures.mutants.catalog import add_patch, copy_platform
from fixtures.mutants.runner import run_pytest
from fixtures.platform import Outcome, user_headers
from fixtures.standalone.backend import StandalonePlatform

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"
TENANTA_KUSTOMIZATION = "tenants/tenanta/kustomization.yaml"

# The tenant component's replacements run before this kustomization's own patches, so
# the policy is matched under its final namespace, not the base's placeholder TENANT.
DELETE_TENANTA_POLICY = {"patch": """$patch: delete
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: tenant-isolation
  namespace: tenanta
"""}

UNKNOWN_FIELD = {"target": {"kind": "AuthorizationPolicy", "name": "tenant-isolation"}, "patch": """- op: add
  path: /spec/rules/0/from/1/source/ipBlocks
  value: ["10.0.0.0/8"]
"""}


def isolation_policies(platform_dir: Path) -> set[str]:
    return {d["metadata"]["namespace"] for d in render(platform_dir, "standalone")
            if d["kind"] == "AuthorizationPolicy" and d["metadata"]["name"] == "tenant-isolation"}


@dataclass(frozen=True)
class Variant:
    name: str
    mutate: Callable[[Path], None] | None
    policies: frozenset[str]  # namespaces whose tenant-isolation policy the render holds
    tokenless: Outcome        # tenanta app-ui -> tenanta rag-api with no token

    def __str__(self) -> str:
        return f"{self.name}: a call without token to tenanta's rag-api is {self.tokenless}"


VARIANTS = [
    Variant("the platform as it is", None, frozenset({"tenanta", "tenantb"}), Outcome.RBAC_403),
    Variant("a copy without tenanta's AuthorizationPolicy",
            lambda copy: add_patch(copy, TENANTA_KUSTOMIZATION, DELETE_TENANTA_POLICY),
            frozenset({"tenantb"}), Outcome.OK),
]


def _target(namespace: str) -> str:
    return f"rag-api.{namespace}.svc.cluster.local:8080"


@pytest.mark.parametrize("variant", VARIANTS, ids=str)
def test_deleting_the_authorization_policy_changes_behaviour(variant: Variant, tmp_path: Path) -> None:
    platform_dir = PLATFORM
    if variant.mutate is not None:
        platform_dir = copy_platform(tmp_path)
        variant.mutate(platform_dir)
    assert isolation_policies(platform_dir) == variant.policies

    plat = StandalonePlatform(platform_dir)
    try:
        plat.start()
        for tenant in plat.tenants:
            caller = plat.workload(tenant, "app-ui")
            token = plat.idp(tenant).token()
            # Positive control: a signed-in user of the tenant gets through either way.
            caller.call(_target(tenant.namespace), "/whoami", headers=user_headers(tenant, token)).expect(Outcome.OK)
            expected = variant.tokenless if tenant.name == "tenanta" else Outcome.RBAC_403
            res = caller.call(_target(tenant.namespace), "/whoami").expect(expected)
            if expected is Outcome.OK:  # let in with no verified identity at all
                assert res.json()["claims"] is None, res.describe()
        pids = [p.pid for p in plat.supervisor.processes.values() if p.pid]
    finally:
        plat.close()
    assert not [pid for pid in pids if pid_alive(pid)], "close() left processes of the platform running"
    assert not plat.run_dir.exists()




def test_suite_run_against_an_unknown_field_fails_naming_it(tmp_path: Path) -> None:
    copy = copy_platform(tmp_path)
    add_patch(copy, TENANTA_KUSTOMIZATION, UNKNOWN_FIELD)
    run = run_pytest(["suites/ingress"], platform_dir=copy, work=tmp_path, timeout=240)
    assert run.returncode not in (None, 0, 5), f"exit {run.returncode}:\n{run.output[-4000:]}"  # 5: nothing collected
    assert run.report is not None and run.report.failed, run.output[-4000:]
    assert not run.report.passed, f"tests passed against a platform the backend cannot run: {run.report.passed}"
    for test, failure in run.report.failed.items():  # every test fails, naming the resource and the field
        for name in ("UnsupportedField", "AuthorizationPolicy tenanta/tenant-isolation",
                     "spec.rules[0].from[1].source.ipBlocks"):
            assert name in failure, f"{test}: {name!r} not in:\n{failure[-3000:]}"
    assert not run.leftovers, "the failed run left its run directory behind"
