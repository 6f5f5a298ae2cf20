"""The IAM layer: each tenant's rag-api role (stack <tenant>-rag-api-iam of
platform/aws/tenant-iam.yaml) may read its own index, use its own sessions table and call
its own models, and nothing of another tenant's; only the tenant's rag-api pods can assume it.

Real IAM decides every row (capability "aws-iam-simulation": the eks backend), read-only:
iam:SimulatePrincipalPolicy for the permissions, naming the statement that decided each
row, and iam:GetRole for the trust policy (fixtures/eks/iam.py). The table of rows is
fixtures.eks.iam.probes; its offline twin is tests/test_tenant_iam.py.

A deny counts only after its positive controls passed in the same run: the role's own
allowed rows, and, for another tenant's resource, the owner's role allowed the same call.
"""

from __future__ import annotations

import pytest

from fixtures.eks.iam import ALLOWED, Decision
from fixtures.platform import MissingCapability

pytestmark = pytest.mark.cluster


@pytest.fixture(scope="module")
def iam_layer(platform):
    """(the IAM layer, every tenant role's decisions), asked once for the module; nothing
    is created, so nothing is cleaned up. Skips, naming the capability, without real IAM."""
    try:
        platform.requires("aws-iam-simulation")
    except MissingCapability as exc:
        pytest.skip(str(exc))
    layer = platform.iam_layer()
    return layer, {t.name: layer.check(t, platform.tenants) for t in platform.tenants}


def _deployed(platform, tenant):
    """The tenant as the cluster has it (its ConfigMap), not as the repository renders it."""
    found = [t for t in platform.tenants if t.name == tenant.name]
    assert found, f"tenant {tenant} of the catalog is not deployed (cluster has {[t.name for t in platform.tenants]})"
    return found[0]


def test_rag_api_role_reaches_only_its_tenants_resources(platform, iam_layer, tenant):
    _, decisions = iam_layer
    mine: list[Decision] = decisions[_deployed(platform, tenant).name]
    controls = [d for d in mine if d.probe.expect == ALLOWED]
    failed = [d for d in controls if not d.ok]
    assert controls and not failed, "positive controls (the role's own resources) failed:\n" + \
        "\n".join(map(str, failed or mine))
    owners_allowed = {(d.probe.role_of, d.probe.action, d.probe.resource)
                      for ds in decisions.values() for d in ds if d.probe.expect == ALLOWED and d.ok}
    uncontrolled = [d for d in mine if d.probe.owner != tenant.name
                    and (d.probe.owner, d.probe.action, d.probe.resource) not in owners_allowed]
    assert not uncontrolled, "denies without a positive control (the owner's role allowed the same call):\n" + \
        "\n".join(map(str, uncontrolled))
    wrong = [d for d in mine if not d.ok]
    assert not wrong, f"{tenant}'s rag-api role, as IAM decides it:\n" + "\n".join(map(str, wrong))


def test_only_the_tenants_rag_api_can_assume_its_role(platform, iam_layer, tenant):
    layer, decisions = iam_layer
    assert any(d.ok and d.probe.expect == ALLOWED for d in decisions[tenant.name]), "the role itself does not work"
    problems = layer.trust_problems(_deployed(platform, tenant))
    assert not problems, f"trust policy of {tenant}'s rag-api role:\n" + "\n".join(problems)
