"""Certificate-authority boundaries: a tenant's sidecar accepts workload certificates from
its own CA (and the gateway's identity from the mesh root) and nothing else.

The callers present certificates minted for the test (``platform.presenting``) straight
to the target's sidecar, as a process holding a stolen CA key or a forged certificate
would. Each row starts with the positive control: the target's own identity, signed by its
own CA, valid now, is accepted and seen by the workload.
"""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from fixtures.platform import Outcome
from suites.isolation.probes import expect_caller_seen, service, spiffe, user

pytestmark = pytest.mark.standalone_required

APP = "app-ui"  # the identity presented: the target tenant's UI calling its API


@dataclass(frozen=True)
class CertCase:
    name: str
    identity_of: str          # "target" or "other": whose SPIFFE id the certificate carries
    signed_by: str            # whose CA key signs it
    issuer_named: str | None = None  # whose CA it claims as issuer (a forgery), if not the signer's
    validity: str = "current"
    expect: Outcome = Outcome.TLS_REFUSED

    def __str__(self) -> str:
        return f"{self.name} is {self.expect}"


def _present(platform, case: CertCase, target, other):
    pick = {"target": target, "other": other}
    return platform.presenting(spiffe(pick[case.identity_of], APP), signed_by=pick[case.signed_by],
                               validity=case.validity,
                               issuer_named=pick[case.issuer_named] if case.issuer_named else None)


def _control(platform, tenant):
    __tracebackhide__ = True
    ok = platform.presenting(spiffe(tenant, APP), signed_by=tenant)
    res = ok.call(service(tenant, "rag-api"), "/whoami", headers=user(platform, tenant))
    expect_caller_seen(res, spiffe(tenant, APP))


VALIDITY_CASES = [
    CertCase("own identity from own CA, expired", "target", "target", validity="expired"),
    CertCase("own identity from own CA, not yet valid", "target", "target", validity="not-yet-valid"),
]

FOREIGN_CASES = [
    CertCase("other tenant's identity from its own CA", "other", "other"),
    CertCase("this tenant's identity signed by the other tenant's CA", "target", "other"),
    CertCase("this tenant's identity naming this tenant's CA but signed with the other tenant's key",
             "target", "other", issuer_named="target"),
    # A CA this tenant trusts, naming another namespace: the handshake passes, the policy refuses.
    CertCase("other tenant's identity signed by this tenant's own CA", "other", "target", expect=Outcome.RBAC_403),
]


@pytest.mark.parametrize("case", VALIDITY_CASES, ids=str)
def test_certificate_outside_its_validity_is_refused(platform, tenant, case):
    _control(platform, tenant)
    res = _present(platform, case, tenant, tenant).call(service(tenant, "rag-api"), "/whoami",
                                                       headers=user(platform, tenant))
    res.expect(case.expect)


@pytest.mark.parametrize("case", FOREIGN_CASES, ids=str)
def test_certificate_from_another_tenants_ca_is_refused(platform, cross_tenant_pair, case):
    other, target = cross_tenant_pair
    _control(platform, target)
    res = _present(platform, case, target, other).call(service(target, "rag-api"), "/whoami",
                                                       headers=user(platform, target))
    res.expect(case.expect)
