"""The isolation suite catches each way of breaking tenant isolation in the platform's code.

Each row copies platform/, breaks it the way a bad change would (a Kustomize patch in the
tenant's overlay, or an edited base/mesh file), runs a targeted part of
``suites/isolation`` against the copy (``--platform-dir``) in a subprocess, and reads its
JUnit report: the named tests must fail, for the named reason, and nothing else may
(failures outside the broken part would mean the suite fails for the wrong reason).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import pytest
import yaml

from fixtures.mutants import catalog
from fixtures.mutants.catalog import copy_platform
from fixtures.mutants.runner import run_pytest

pytestmark = pytest.mark.slow

SUITE_TIMEOUT_S = 300


def add_patch(copy: Path, tenant: str, patch: dict) -> None:
    """Append a Kustomize patch to the tenant's overlay (patches run after the tenant
    component, so targets carry their final names and namespaces)."""
    catalog.add_patch(copy, f"tenants/{tenant}/kustomization.yaml", patch)


def tenant_yaml(copy: Path, tenant: str) -> dict:
    return yaml.safe_load((copy / "tenants" / tenant / "tenant.yaml").read_text())["data"]


# -- the breakages -------------------------------------------------------------------------

def delete_tenanta_policy(copy: Path) -> None:
    add_patch(copy, "tenanta", {"patch": yaml.safe_dump({
        "$patch": "delete", "apiVersion": "security.istio.io/v1", "kind": "AuthorizationPolicy",
        "metadata": {"name": "tenant-isolation", "namespace": "tenanta"}})})


def peer_authentication_permissive(copy: Path) -> None:
    path = copy / "mesh" / "peer-authentication.yaml"
    text = path.read_text()
    assert "mode: STRICT" in text, "mesh/peer-authentication.yaml changed; update this breakage"
    path.write_text(text.replace("mode: STRICT", "mode: PERMISSIVE"))


def tenanta_issuer_is_tenantbs(copy: Path) -> None:
    b = tenant_yaml(copy, "tenantb")
    add_patch(copy, "tenanta", {"target": {"kind": "RequestAuthentication", "name": "tenant-jwt"}, "patch": yaml.safe_dump([
        {"op": "replace", "path": "/spec/jwtRules/0/issuer", "value": b["issuer"]},
        {"op": "replace", "path": "/spec/jwtRules/0/jwksUri", "value": b["jwksUri"]}])})


def claim_condition_removed(copy: Path) -> None:
    """The custom:tenantid condition deleted from the namespace AuthorizationPolicy of every
    tenant; the component's replacements that address conditions by index follow suit."""
    policy = copy / "base" / "authorization-policy.yaml"
    doc = yaml.safe_load(policy.read_text())
    when = doc["spec"]["rules"][0]["when"]
    assert when[1]["key"] == "request.auth.claims[custom:tenantid]", "base policy changed; update this breakage"
    del when[1]
    policy.write_text(yaml.safe_dump(doc, sort_keys=False))
    component = copy / "base" / "tenant" / "kustomization.yaml"
    text = component.read_text()
    old = "- spec.rules.0.when.1.values.0\n          - spec.rules.0.when.3.values.0"
    assert old in text, "base/tenant component changed; update this breakage"
    component.write_text(text.replace(old, "- spec.rules.0.when.2.values.0"))


def tenantb_identities_from_the_mesh_root(copy: Path) -> None:
    """tenantb's workload identities issued by the mesh root, which tenanta's sidecars trust
    (for the gateway): tenant B's CA is now trusted by tenant A."""
    add_patch(copy, "tenantb", {"target": {"kind": "Namespace", "name": "tenantb"}, "patch": yaml.safe_dump([
        {"op": "replace", "path": "/metadata/annotations/platform.example.com~1workload-issuer",
         "value": "ClusterIssuer/mesh-root"}])})


@dataclass(frozen=True)
class Expected:
    test: str      # a substring of the failing test's id
    reason: str    # a substring of its failure message


@dataclass(frozen=True)
class Breakage:
    name: str
    mutate: Callable[[Path], None] = field(repr=False)
    select: tuple[str, ...]          # pytest arguments choosing the part of the suite to run
    must_fail: tuple[Expected, ...]
    only: tuple[str, ...]            # every failing test id contains one of these

    def __str__(self) -> str:
        return self.name


BREAKAGES = [
    Breakage("tenanta's AuthorizationPolicy deleted", delete_tenanta_policy,
             ("suites/isolation/test_jwt.py", "-k", "test_token_at_the_workload"),
             (Expected("test_token_at_the_workload[tenanta-no token is denied",
                       "expected denied: authorization policy (403), got allowed (2xx)"),
              Expected("test_token_at_the_workload[tenanta-own pool's user whose custom:tenantid names another",
                       "got allowed (2xx)")),
             only=("[tenanta-",)),
    Breakage("PeerAuthentication PERMISSIVE", peer_authentication_permissive,
             ("suites/isolation/test_east_west.py", "-k", "test_caller_without_mesh_identity"),
             (Expected("outside in plaintext is reset", "expected connection reset or closed, got denied: "
                                                        "authorization policy (403)"),),
             only=("outside in plaintext",)),
    Breakage("tenanta's RequestAuthentication issuer pointed at tenantb's pool", tenanta_issuer_is_tenantbs,
             ("suites/isolation/test_drift.py", "suites/isolation/test_jwt.py", "-k",
              "test_drift or test_token_at_the_workload"),
             (Expected("test_configuration_matches_the_tenants_cognito_pool[tenanta]",
                       "RequestAuthentication tenanta/tenant-jwt spec.jwtRules[0].issuer is "
                       "'https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Kq3B8vR2m', the tenant's Cognito "
                       "pool says 'https://cognito-idp.us-east-1.amazonaws.com/us-east-1_Tn7A2xQ9p'"),
              Expected("test_token_at_the_workload[tenanta-own user's id token with matching claim and header",
                       "got denied: authentication (401)")),
             only=("[tenanta",)),
    Breakage("custom:tenantid condition removed from the namespace AuthorizationPolicy", claim_condition_removed,
             ("suites/isolation/test_jwt.py", "-k", "test_token_at_the_workload"),
             (Expected("test_token_at_the_workload[tenanta-own pool's user whose custom:tenantid names another",
                       "expected denied: authorization policy (403), got allowed (2xx)"),
              Expected("test_token_at_the_workload[tenantb-own pool's user whose custom:tenantid names another",
                       "expected denied: authorization policy (403), got allowed (2xx)")),
             only=("whose custom:tenantid names another",)),
    Breakage("tenant B's CA trusted by tenant A", tenantb_identities_from_the_mesh_root,
             ("suites/isolation/test_east_west.py", "suites/isolation/test_ca_boundaries.py", "-k",
              "test_workload_to_workload or test_certificate_from_another_tenants_ca"),
             (Expected("test_workload_to_workload[tenantb->tenanta-app-ui calls rag-api]",
                       "expected denied: TLS handshake refused, got denied: authorization policy (403)"),
              Expected("test_certificate_from_another_tenants_ca_is_refused[tenantb->tenanta-other tenant's identity "
                       "from its own CA", "expected denied: TLS handshake refused, got denied: authorization policy"),
              Expected("test_certificate_from_another_tenants_ca_is_refused[tenantb->tenanta-this tenant's identity "
                       "signed by the other tenant's CA", "got allowed (2xx)")),
             only=("[tenantb->tenanta-",)),
]


@pytest.mark.parametrize("breakage", BREAKAGES, ids=str)
def test_isolation_suite_catches_the_breakage(breakage, tmp_path):
    copy = copy_platform(tmp_path)
    breakage.mutate(copy)
    run = run_pytest(breakage.select, platform_dir=copy, work=tmp_path, timeout=SUITE_TIMEOUT_S)
    assert run.report is not None, f"the suite produced no report (exit {run.returncode}):\n{run.output}"
    report = run.report
    summary = "\n".join(f"FAILED {k}: {v.splitlines()[0][:300]}" for k, v in report.failed.items())
    assert report.failed, f"{breakage}: the isolation suite passed against the broken platform\n{run.output}"
    for want in breakage.must_fail:
        hits = [k for k in report.failed if want.test in k]
        assert hits, f"{breakage}: expected {want.test!r} to fail; failures:\n{summary}\n{run.output}"
        assert any(want.reason in report.failed[k] for k in hits), \
            f"{breakage}: {hits[0]} failed, but not because {want.reason!r}:\n{report.failed[hits[0]][:3000]}"
    unrelated = [k for k in report.failed if not any(o in k for o in breakage.only)]
    assert not unrelated, f"{breakage}: tests failed that the breakage does not explain:\n{summary}"
    # the rest of the selection ran and passed: the suite failed where it should, not everywhere
    assert report.passed, f"{breakage}: nothing passed; the suite did not work at all:\n{run.output}"
    assert not run.leftovers, f"the run left {run.leftovers} behind"
