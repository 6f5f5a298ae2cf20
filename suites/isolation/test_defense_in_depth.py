"""Defense in depth: switch off one isolation layer at a time and show that the others
still refuse another tenant, and which layer now does it.

Layers: CA separation (a tenant's sidecars trust only its own CA and the mesh root), the
tenants' AuthorizationPolicies (only the gateway and the tenant's own namespace, on behalf
of the tenant's users), the JWT claim check (``custom:tenantid`` names the tenant) and the
header check (``x-auth-request-tenantid`` names the tenant). Each layer is switched off by a
fault (``platform.fault``), reverted at the end of the block.

Every probe is sent three times: before the fault (the normal refusal), during it, and
after it (the normal refusal again, so the fault was reverted). One probe per layer is
refused by that layer alone: it gets through while the layer is off, proving the fault
took effect. Probes run for every ordered pair (attacker tenant, victim tenant).

Expectations follow the platform's capabilities, as in test_east_west. Where one CA signs
every workload (no "per-tenant-ca", istiod's CA on a cluster), there is no CA separation to
switch off, a call from another tenant's workload completes its handshake and is refused
by the victim's AuthorizationPolicy (403), and with the AuthorizationPolicies off nothing
else refuses it. A layer whose fault the backend cannot inject skips, naming what is
missing, before any probe is sent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import pytest

from fixtures.platform import CallResult, MissingCapability, Outcome, Tenant
from suites.isolation.probes import expect_at, per_tenant_ca, service, spiffe, user, via_gateway

pytestmark = [pytest.mark.standalone_required, pytest.mark.chaos]

Send = Callable[..., CallResult]
# Which certificate authorities a probe row holds for (Probe.ca).
ANY_CA, PER_TENANT_CA, ONE_CA = "any", "per-tenant", "one for every workload"


def _other_name(platform, tenant: Tenant) -> str:
    return next(t.name for t in platform.tenants if t.name != tenant.name)


def dst_user_from_src_app_ui(platform, src, dst) -> CallResult:
    return platform.workload(src, "app-ui").call(service(dst, "rag-api"), "/whoami", headers=user(platform, dst))


def src_certificate_to_dst(platform, src, dst) -> CallResult:
    return platform.presenting(spiffe(src, "app-ui"), signed_by=src).call(
        service(dst, "rag-api"), "/whoami", headers=user(platform, dst))


def no_user_from_dst_app_ui(platform, src, dst) -> CallResult:
    return platform.workload(dst, "app-ui").call(service(dst, "rag-api"), "/whoami",
                                                 headers={"x-auth-request-tenantid": dst.name})


def src_user_at_dst_host(platform, src, dst) -> CallResult:
    return via_gateway(platform, dst, user(platform, src, header=dst.name))


def src_user_from_dst_app_ui(platform, src, dst) -> CallResult:
    return platform.workload(dst, "app-ui").call(service(dst, "rag-api"), "/whoami",
                                                 headers=user(platform, src, header=dst.name))


def dst_mallory_at_dst_host(platform, src, dst) -> CallResult:
    return via_gateway(platform, dst, user(platform, dst, "mallory"))


def dst_user_header_naming_another(platform, src, dst) -> CallResult:
    return via_gateway(platform, dst, user(platform, dst, header=_other_name(platform, dst)))


@dataclass(frozen=True)
class Probe:
    what: str
    send: Send
    normally: Outcome
    when_off: Outcome
    at: str                # who decides: "gateway" (checked), "workload", or "caller" (its sidecar's TLS)
    decided_by: str        # which layer refuses it while the one under test is off
    ca: str = ANY_CA       # PER_TENANT_CA / ONE_CA: the row holds only where the tenants' CAs are so

    def holds_on(self, platform) -> bool:
        return self.ca == ANY_CA or (self.ca == PER_TENANT_CA) == per_tenant_ca(platform)

    def check(self, platform, src, dst, outcome: Outcome, phase: str) -> None:
        __tracebackhide__ = True
        res = self.send(platform, src, dst)
        try:
            if self.at == "gateway" and outcome is not Outcome.OK:
                expect_at(res, outcome, "gateway")  # refused at the edge, not behind it
            else:
                res.expect(outcome)
        except AssertionError as exc:
            raise AssertionError(f"{phase}: {self.what} [{src} attacks {dst}]; while off it should be "
                                 f"refused by {self.decided_by}:\n{exc}") from None


@dataclass(frozen=True)
class Layer:
    name: str
    fault: str
    probes: tuple[Probe, ...]
    needs: tuple[str, ...] = ()   # capabilities without which the layer does not exist or cannot be probed

    def __str__(self) -> str:
        return f"{self.name} switched off"

    def probes_on(self, platform) -> list[Probe]:
        return [p for p in self.probes if p.holds_on(platform)]


CROSS = "the victim's user, sent by the attacker's app-ui"
HANDSHAKE = "CA separation (handshake refused)"
SOURCE_NAMESPACE = "the victim's AuthorizationPolicy (caller not from its namespace)"


LAYERS = [
    Layer("CA separation", "ca-separation-off", (
        Probe(CROSS, dst_user_from_src_app_ui, Outcome.TLS_REFUSED, Outcome.RBAC_403, "workload", SOURCE_NAMESPACE),
        Probe("the attacker's workload certificate, straight to the victim's sidecar", src_certificate_to_dst,
              Outcome.TLS_REFUSED, Outcome.RBAC_403, "workload", SOURCE_NAMESPACE),
    ), needs=("per-tenant-ca", "identities")),
    Layer("AuthorizationPolicy of the tenants' namespaces", "authz-policy-off", (
        Probe("the victim's own app-ui calling without a user token", no_user_from_dst_app_ui,
              Outcome.RBAC_403, Outcome.OK, "workload", "nothing: only this layer refuses it"),
        Probe(CROSS, dst_user_from_src_app_ui, Outcome.TLS_REFUSED, Outcome.TLS_REFUSED, "caller", HANDSHAKE,
              ca=PER_TENANT_CA),
        Probe(CROSS, dst_user_from_src_app_ui, Outcome.RBAC_403, Outcome.OK, "workload",
              "nothing: with one CA for every workload only this layer refuses it", ca=ONE_CA),
        Probe("the attacker's user at the victim's host", src_user_at_dst_host,
              Outcome.RBAC_403, Outcome.RBAC_403, "gateway", "the gateway's edge policy for the victim's host"),
    )),
    Layer("JWT claim check", "jwt-claim-check-off", (
        Probe("the victim's pool user whose custom:tenantid names another tenant", dst_mallory_at_dst_host,
              Outcome.RBAC_403, Outcome.OK, "gateway", "nothing: only this layer refuses it"),
        Probe("the attacker's user at the victim's host, header naming the victim", src_user_at_dst_host,
              Outcome.RBAC_403, Outcome.RBAC_403, "gateway", "the issuer condition of the edge policy alone"),
        Probe("the attacker's user sent by the victim's own app-ui", src_user_from_dst_app_ui,
              Outcome.AUTHN_401, Outcome.AUTHN_401, "workload",
              "the victim's RequestAuthentication (only its own pool's issuer)"),
        Probe(CROSS, dst_user_from_src_app_ui, Outcome.TLS_REFUSED, Outcome.TLS_REFUSED, "caller", HANDSHAKE,
              ca=PER_TENANT_CA),
        Probe(CROSS, dst_user_from_src_app_ui, Outcome.RBAC_403, Outcome.RBAC_403, "workload", SOURCE_NAMESPACE,
              ca=ONE_CA),
    )),
    Layer("header check", "header-check-off", (
        Probe("the victim's user with x-auth-request-tenantid naming another tenant", dst_user_header_naming_another,
              Outcome.RBAC_403, Outcome.OK, "gateway", "nothing: only this layer refuses it"),
        Probe("the victim's pool user whose custom:tenantid names another tenant", dst_mallory_at_dst_host,
              Outcome.RBAC_403, Outcome.RBAC_403, "gateway", "the claim condition of the edge policy alone"),
        Probe("the attacker's user at the victim's host, header naming the victim", src_user_at_dst_host,
              Outcome.RBAC_403, Outcome.RBAC_403, "gateway", "the issuer and claim conditions of the edge policy"),
        Probe(CROSS, dst_user_from_src_app_ui, Outcome.TLS_REFUSED, Outcome.TLS_REFUSED, "caller", HANDSHAKE,
              ca=PER_TENANT_CA),
        Probe(CROSS, dst_user_from_src_app_ui, Outcome.RBAC_403, Outcome.RBAC_403, "workload", SOURCE_NAMESPACE,
              ca=ONE_CA),
    )),
]


@pytest.mark.parametrize("layer", LAYERS, ids=str)
def test_remaining_layers_still_refuse(platform, requires, layer):
    for capability in layer.needs:
        requires(capability)
    try:
        # Asked for before any probe: a layer this backend cannot switch off skips, it does
        # not fail in the "before" phase.
        switched_off = platform.fault(layer.fault)
    except MissingCapability as exc:
        pytest.skip(str(exc))
    probes = layer.probes_on(platform)
    pairs = [(a, b) for a in platform.tenants for b in platform.tenants if a != b]
    assert pairs, "defense in depth needs two tenants in the catalog"
    for src, dst in pairs:
        via_gateway(platform, dst, user(platform, dst)).expect(Outcome.OK)  # positive control
        for probe in probes:
            probe.check(platform, src, dst, probe.normally, "before the fault")
    with switched_off as fault:
        assert not fault.rejected, f"{layer.fault}: proxies refused the change: {fault.rejected}"
        for src, dst in pairs:
            via_gateway(platform, dst, user(platform, dst)).expect(Outcome.OK)
            for probe in probes:
                probe.check(platform, src, dst, probe.when_off, f"with {layer}")
    for src, dst in pairs:
        for probe in probes:
            probe.check(platform, src, dst, probe.normally, "after the fault was reverted")
