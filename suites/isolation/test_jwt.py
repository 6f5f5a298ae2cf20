"""JWT checks, at the gateway and at each tenant's sidecar: the case table of
``jwt_cases``, a property test that mutates real tokens at random and never gets through,
and the identity provider's keys unreachable or slow (fail closed).

Every row first sends the tenant's real token to the same target (positive control).
"""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from fixtures import tokens
from fixtures.platform import Outcome
from fixtures.report import record
from fixtures.wait import eventually
from suites.isolation.jwt_cases import CROSS_CASES, GATEWAY_CASES, WORKLOAD_CASES, Ctx, Sent
from suites.isolation.probes import decided_at, expect_at, expect_denied, service, via_gateway

pytestmark = pytest.mark.standalone_required


@pytest.fixture(scope="module")
def attacker_jwks():
    """The attacker's JWKS served on loopback for ``jku`` injection; records fetches.
    Stopped at the end of the module."""
    with tokens.JwksServer.running({"keys": [tokens.public_jwk(tokens.foreign_key(), "attacker")]}) as srv:
        yield srv


def _needs(requires, case) -> None:
    if case.needs:
        requires(case.needs)


def _from_own_app_ui(platform, tenant, sent):
    return platform.workload(tenant, "app-ui").call(service(tenant, "rag-api"), sent.path.replace("/api/", "/", 1),
                                                    headers=sent.headers)


@pytest.mark.parametrize("case", GATEWAY_CASES, ids=str)
def test_token_at_the_gateway(platform, requires, tenant, case, attacker_jwks, request):
    _needs(requires, case)
    ctx = Ctx(platform, tenant, jku_url=attacker_jwks.url)
    expect_at(via_gateway(platform, tenant, ctx.headers(ctx.token)), Outcome.OK, "workload")
    sent = case.build(ctx)
    res = via_gateway(platform, tenant, sent.headers, sent.path)
    record(request.node, "jwt", tenant=tenant, case=case.name, at="gateway", expected=case.expect,
           expected_at=case.at if case.expect is not Outcome.OK else "workload", result=res, decided_at=decided_at(res))
    expect_at(res, case.expect, case.at if case.expect is not Outcome.OK else "workload")
    if case.expect is Outcome.OK:
        assert res.json()["claims"]["custom:tenantid"] == tenant.name, res.describe()
    assert attacker_jwks.fetches == [], f"a proxy fetched the attacker's JWKS: {attacker_jwks.fetches}"


@pytest.mark.parametrize("case", WORKLOAD_CASES, ids=str)
def test_token_at_the_workload(platform, requires, tenant, case, request):
    _needs(requires, case)
    ctx = Ctx(platform, tenant)
    _from_own_app_ui(platform, tenant, Sent(ctx.headers(ctx.token))).expect(Outcome.OK)
    res = _from_own_app_ui(platform, tenant, case.build(ctx))
    record(request.node, "jwt", tenant=tenant, case=case.name, at="workload", expected=case.expect,
           expected_at="workload", result=res)
    res.expect(case.expect)


@pytest.mark.parametrize("case", CROSS_CASES, ids=str)
def test_other_tenants_token(platform, requires, cross_tenant_pair, case, request):
    src, dst = cross_tenant_pair
    _needs(requires, case)
    src_ctx, dst_ctx = Ctx(platform, src), Ctx(platform, dst)
    sent = case.build(src_ctx, dst)
    if case.at == "workload":
        _from_own_app_ui(platform, dst, Sent(dst_ctx.headers(dst_ctx.token))).expect(Outcome.OK)
        res = _from_own_app_ui(platform, dst, sent)
        record(request.node, "jwt", tenant=dst, from_tenant=src, case=case.name, at="workload",
               expected=case.expect, expected_at="workload", result=res)
        res.expect(case.expect)
        return
    expect_at(via_gateway(platform, dst, dst_ctx.headers(dst_ctx.token)), Outcome.OK, "workload")
    res = via_gateway(platform, dst, sent.headers, sent.path)
    record(request.node, "jwt", tenant=dst, from_tenant=src, case=case.name, at="gateway", expected=case.expect,
           expected_at=case.at, result=res, decided_at=decided_at(res))
    expect_at(res, case.expect, case.at)


# -- property: a real token, changed in any way, never gets through ---------------------------

B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"


def _canonical(token: str):
    """What a verifier compares: header and payload as sent (the signing input) and the
    signature's bytes (two spellings of one base64 value are the same signature)."""
    parts = token.split(".")
    if len(parts) == 3:
        try:
            return parts[0], parts[1], tokens.b64url_decode(parts[2])
        except ValueError:
            pass
    return token


@st.composite
def mutated(draw, token: str) -> str:
    jwt = tokens.Jwt.parse(token)
    kind = draw(st.sampled_from(["character", "claims", "header", "signature", "segments"]))
    if kind == "character":
        out = list(token)
        for _ in range(draw(st.integers(1, 3))):
            i = draw(st.integers(0, len(out) - 1))
            out[i] = draw(st.sampled_from(B64URL + ".="))
        result = "".join(out)
    elif kind == "claims":
        key = draw(st.sampled_from(sorted(jwt.payload) + ["admin", "custom:tenantid"]))
        value = draw(st.one_of(st.none(), st.text(B64URL, max_size=12), st.integers(), st.booleans()))
        result = jwt.with_claims(**{key: value}).encode()  # None removes the claim
    elif kind == "header":
        alg = draw(st.sampled_from(["none", "None", "HS256", "HS512", "RS512", "ES256", "PS256", "", "RS256"]))
        extra = draw(st.sampled_from([{}, {"kid": "attacker"}, {"kid": ""}, {"crit": ["exp"]},
                                      {"jku": "http://127.0.0.1:9/jwks.json"}, {"typ": "at+jwt"}]))
        result = jwt.with_header(alg=alg, **extra).encode()
    elif kind == "signature":
        sig = bytearray(jwt.signature)
        op = draw(st.sampled_from(["flip", "truncate", "extend", "empty"]))
        if op == "flip":
            i = draw(st.integers(0, len(sig) - 1))
            sig[i] ^= 1 << draw(st.integers(0, 7))
        elif op == "truncate":
            sig = sig[:draw(st.integers(0, len(sig) - 1))]
        elif op == "extend":
            sig += bytes(draw(st.binary(min_size=1, max_size=8)))
        else:
            sig = bytearray()
        result = tokens.Jwt(jwt.header, jwt.payload, bytes(sig), jwt.raw_header, jwt.raw_payload).encode()
    else:
        h, p, s = token.split(".")
        result = draw(st.sampled_from([f"{p}.{h}.{s}", f"{h}.{p}", f"{h}.{p}.{s}.{s}", f"{h}..{s}", f".{p}.{s}",
                                       f"{h}.{h}.{s}", f"{h}.{p}.{s}{s}"]))
    assume(_canonical(result) != _canonical(token))
    return result


def test_mutated_tokens_never_pass(platform, tenant):
    ctx = Ctx(platform, tenant)
    expect_at(via_gateway(platform, tenant, ctx.headers(ctx.token)), Outcome.OK, "workload")

    @settings(max_examples=60, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
    @given(mutated(ctx.token))
    def never_through(token: str) -> None:
        expect_denied(via_gateway(platform, tenant, ctx.headers(token)),
                      frozenset({Outcome.AUTHN_401, Outcome.AUTHN_403, Outcome.RBAC_403}))

    never_through()


# -- the identity provider's keys unreachable or slow ----------------------------------------

JWKS_FAULTS = {
    "jwks-unreachable": dict(),
    "jwks-slow": dict(delay_s=3.0, timeout_s=1.0),
}
# A refusal must come promptly: the fetch timeout plus headroom for a loaded machine.
PROMPT_S = 5.0


@pytest.mark.chaos
@pytest.mark.parametrize("fault", sorted(JWKS_FAULTS), ids=[f"{f} fails closed" for f in sorted(JWKS_FAULTS)])
def test_identity_provider_keys_unavailable(platform, fault):
    ctxs = [Ctx(platform, t) for t in platform.tenants]
    for c in ctxs:
        expect_at(via_gateway(platform, c.tenant, c.headers(c.token)), Outcome.OK, "workload")
    with platform.fault(fault, **JWKS_FAULTS[fault]) as f:
        assert not f.rejected, f.rejected
        for c in ctxs:
            res = expect_at(via_gateway(platform, c.tenant, c.headers(c.token)), Outcome.AUTHN_401, "gateway")
            assert res.elapsed < PROMPT_S, f"refused only after {res.elapsed:.1f}s:\n{res.describe()}"
            res = _from_own_app_ui(platform, c.tenant, Sent(c.headers(c.token)))
            res.expect(Outcome.AUTHN_401)
            assert res.elapsed < PROMPT_S, f"refused only after {res.elapsed:.1f}s:\n{res.describe()}"
    for c in ctxs:
        eventually(lambda c=c: via_gateway(platform, c.tenant, c.headers(c.token)).expect(Outcome.OK),
                   timeout=20, what=f"{c.tenant} served again after {fault}")
