"""The JWT case table (REFERENCE.md's list plus jwt_tool's playbook), as data.

A case builds the headers (and path) of one request for one tenant from a :class:`Ctx`
(the tenant's real token, its pool's keys, the other tenants) and says how the platform
must refuse it, and where: ``gateway`` (the edge RequestAuthentication/AuthorizationPolicy
of the tenant's host) or ``workload`` (the tenant's sidecar). The platform's choices:

* a token that fails verification (signature, ``alg``, key, expiry, unknown issuer) is
  refused by authentication: 401;
* a token for another audience (another app client, or a Cognito *access* token, which has
  no ``aud``) is refused by authentication with Envoy's 403 "Audiences in Jwt are not
  allowed": the platform requires *id* tokens (platform/base/request-authentication.yaml);
* a valid token of the wrong tenant, a claim or header that does not name the host's
  tenant, or no token at all: 403 from the AuthorizationPolicy (a token elsewhere than
  ``Authorization: Bearer`` counts as no token);
* an id token whose ``token_use`` is not ``id`` passes the gateway (its policy does not look
  at ``token_use``) and is refused by the tenant's sidecar: 403 at the workload.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field
from typing import Any, Callable

from fixtures import tokens
from fixtures.platform import Outcome, Tenant
from suites.isolation.probes import issued

SIGN = "idp-signing-key"  # capability: sign tokens as the tenant's pool (emulators only)


@dataclass
class Ctx:
    """One tenant's material for building requests."""

    platform: Any
    tenant: Tenant
    jku_url: str = ""

    @functools.cached_property
    def token(self) -> str:
        return issued(self.platform, self.tenant)

    @functools.cached_property
    def jwt(self) -> tokens.Jwt:
        return tokens.Jwt.parse(self.token)

    @property
    def kid(self) -> str:
        return self.jwt.header.get("kid", "")

    @functools.cached_property
    def others(self) -> list[Tenant]:
        return [t for t in self.platform.tenants if t.name != self.tenant.name]

    @property
    def another_tenant(self) -> str:
        return self.others[0].name if self.others else f"not-{self.tenant.name}"

    @functools.cached_property
    def jwks(self) -> dict:
        return tokens.jwks(self.platform.idp(self.tenant))

    @functools.cached_property
    def public_key(self):
        return tokens.public_key_from_jwks(self.jwks, self.kid)

    @property
    def public_jwk(self) -> dict:
        return next(k for k in self.jwks["keys"] if k.get("kid") == self.kid)

    def sign(self, **claims: Any) -> str:
        """The tenant's own token with ``claims`` changed (None removes), re-signed with
        the pool's key: valid but for what the claims now say."""
        self.platform.requires(SIGN)
        kid, key = self.platform.idp_signing_key(self.tenant)
        payload = self.jwt.with_claims(**claims).payload
        return tokens.rs256({"kid": kid, "typ": "JWT"}, payload, key)

    def headers(self, token: str | None = None, *, header: str | None = None) -> dict[str, str]:
        out = {"x-auth-request-tenantid": header if header is not None else self.tenant.name}
        if token is not None:
            out["authorization"] = f"Bearer {token}"
        return out


@dataclass(frozen=True)
class Sent:
    headers: dict[str, str]
    path: str = "/api/whoami"


@dataclass(frozen=True)
class JwtCase:
    name: str
    build: Callable[[Ctx], Sent] = field(repr=False)
    expect: Outcome
    at: str = "gateway"
    needs: str | None = None

    def __str__(self) -> str:
        if self.expect is Outcome.OK:
            return f"{self.name} is allowed"
        return f"{self.name} is {self.expect} at the {self.at}"


def _h(fn: Callable[[Ctx], str | None], *, header: Callable[[Ctx], str] | None = None):
    return lambda c: Sent(c.headers(fn(c), header=header(c) if header else None))


def _foreign(c: Ctx, **header: Any) -> str:
    return tokens.rs256({"typ": "JWT", **header}, c.jwt.payload, tokens.foreign_key())


def _flip_signature(c: Ctx) -> str:
    sig = bytearray(c.jwt.signature)
    sig[len(sig) // 2] ^= 0x01
    return tokens.Jwt(c.jwt.header, c.jwt.payload, bytes(sig), c.jwt.raw_header, c.jwt.raw_payload).encode()


def _claims_changed_signature_kept(c: Ctx) -> str:
    # mallory's real token, edited to claim this tenant: the signature no longer covers it
    mallory = tokens.Jwt.parse(issued(c.platform, c.tenant, "mallory"))
    return mallory.with_claims(**{"custom:tenantid": c.tenant.name}).encode()


def _hs256(secret_name: str) -> Callable[[Ctx], str]:
    def build(c: Ctx) -> str:
        secret = tokens.confusion_secrets(c.public_key, c.public_jwk)[secret_name]
        return tokens.hs256({"kid": c.kid, "typ": "JWT"}, c.jwt.payload, secret)
    return build


def _injected_jwk(kid: Callable[[Ctx], str]) -> Callable[[Ctx], str]:
    def build(c: Ctx) -> str:
        k = kid(c)
        return tokens.rs256({"kid": k, "typ": "JWT", "jwk": tokens.public_jwk(tokens.foreign_key(), k)},
                            c.jwt.payload, tokens.foreign_key())
    return build


def _jku(c: Ctx) -> str:
    return tokens.rs256({"kid": "attacker", "typ": "JWT", "jku": c.jku_url}, c.jwt.payload, tokens.foreign_key())


GATEWAY_CASES: list[JwtCase] = [
    JwtCase("own user's id token with matching claim and header", _h(lambda c: c.token), Outcome.OK),
    # -- no token, or a token where the platform does not look for one
    JwtCase("no token", _h(lambda c: None), Outcome.RBAC_403),
    JwtCase("token in the access_token query parameter",
            lambda c: Sent(c.headers(None), f"/api/whoami?access_token={c.token}"), Outcome.RBAC_403),
    JwtCase("token in the id_token query parameter",
            lambda c: Sent(c.headers(None), f"/api/whoami?id_token={c.token}"), Outcome.RBAC_403),
    JwtCase("token in an x-jwt-assertion header",
            lambda c: Sent({**c.headers(None), "x-jwt-assertion": c.token}), Outcome.RBAC_403),
    JwtCase("token in a cookie", lambda c: Sent({**c.headers(None), "cookie": f"id_token={c.token}"}),
            Outcome.RBAC_403),
    JwtCase("token in Authorization without the Bearer scheme",
            lambda c: Sent({**c.headers(None), "authorization": c.token}), Outcome.RBAC_403),
    JwtCase("forged x-jwt-payload header and no token",
            lambda c: Sent({**c.headers(None), "x-jwt-payload": tokens.b64url(json.dumps(c.jwt.payload).encode())}),
            Outcome.RBAC_403),
    # -- a valid token that does not belong here
    JwtCase("x-auth-request-tenantid missing", lambda c: Sent({"authorization": f"Bearer {c.token}"}),
            Outcome.RBAC_403),
    JwtCase("x-auth-request-tenantid naming another tenant",
            _h(lambda c: c.token, header=lambda c: c.another_tenant), Outcome.RBAC_403),
    JwtCase("own pool's user whose custom:tenantid names another tenant",
            _h(lambda c: issued(c.platform, c.tenant, "mallory")), Outcome.RBAC_403),
    JwtCase("Cognito access token (no aud) instead of the id token",
            _h(lambda c: issued(c.platform, c.tenant, kind="access")), Outcome.AUTHN_403),
    JwtCase("id token saying token_use access", _h(lambda c: c.sign(token_use="access")), Outcome.RBAC_403,
            at="workload", needs=SIGN),
    JwtCase("custom:tenantid claim removed", _h(lambda c: c.sign(**{"custom:tenantid": None})), Outcome.RBAC_403,
            needs=SIGN),
    JwtCase("audience of another app client", _h(lambda c: c.sign(aud="0" * 26)), Outcome.AUTHN_403, needs=SIGN),
    JwtCase("no audience", _h(lambda c: c.sign(aud=None)), Outcome.AUTHN_403, needs=SIGN),
    JwtCase("issuer of no configured user pool",
            _h(lambda c: c.sign(iss=c.tenant.issuer.rsplit("/", 1)[0] + "/us-east-1_Unknown00")),
            Outcome.AUTHN_401, needs=SIGN),
    JwtCase("expired token", _h(lambda c: c.sign(exp=tokens.now() - 3600, iat=tokens.now() - 7200)),
            Outcome.AUTHN_401, needs=SIGN),
    JwtCase("nbf in the future", _h(lambda c: c.sign(nbf=tokens.now() + 3600)), Outcome.AUTHN_401, needs=SIGN),
    # -- signatures
    *[JwtCase(f"alg {alg!r} without signature",
              _h(lambda c, alg=alg: tokens.unsigned(c.jwt.header, c.jwt.payload, alg=alg)), Outcome.AUTHN_401)
      for alg in tokens.ALG_NONE_SPELLINGS],
    JwtCase("alg 'none' keeping the original signature",
            _h(lambda c: tokens.unsigned(c.jwt.header, c.jwt.payload, signature=c.jwt.signature)), Outcome.AUTHN_401),
    JwtCase("signature stripped", _h(lambda c: c.token.rsplit(".", 1)[0] + "."), Outcome.AUTHN_401),
    JwtCase("signature with one bit flipped", _h(_flip_signature), Outcome.AUTHN_401),
    JwtCase("signature truncated", _h(lambda c: c.token[:-20]), Outcome.AUTHN_401),
    JwtCase("claims edited under the original signature", _h(_claims_changed_signature_kept), Outcome.AUTHN_401),
    *[JwtCase(f"HS256 keyed with the pool's public key as {name}", _h(_hs256(name)), Outcome.AUTHN_401)
      for name in ("PEM", "PEM without trailing newline", "PKCS#1 PEM", "DER", "JWK JSON", "JWK n")],
    JwtCase("signed with a foreign key under the pool's kid", _h(lambda c: _foreign(c, kid=c.kid)), Outcome.AUTHN_401),
    JwtCase("signed with a foreign key under an unknown kid", _h(lambda c: _foreign(c, kid="attacker")),
            Outcome.AUTHN_401),
    JwtCase("signed with a foreign key and no kid", _h(lambda c: _foreign(c)), Outcome.AUTHN_401),
    JwtCase("jwk header carrying the attacker's key", _h(_injected_jwk(lambda c: "attacker")), Outcome.AUTHN_401),
    JwtCase("jwk header carrying the attacker's key under the pool's kid", _h(_injected_jwk(lambda c: c.kid)),
            Outcome.AUTHN_401),
    JwtCase("jku header pointing at the attacker's JWKS", _h(_jku), Outcome.AUTHN_401),
    JwtCase("kid path traversal to /dev/null with an empty HMAC key",
            _h(lambda c: tokens.hs256({"kid": "../../../../../../dev/null", "typ": "JWT"}, c.jwt.payload, b"")),
            Outcome.AUTHN_401),
    JwtCase("kid with SQL injection", _h(lambda c: _foreign(c, kid="x' UNION SELECT 'attacker' -- ")),
            Outcome.AUTHN_401),
    JwtCase("empty kid", _h(lambda c: _foreign(c, kid="")), Outcome.AUTHN_401),
]

# The same requests sent by the tenant's own app-ui straight to its rag-api: the sidecar
# alone must refuse them (a compromised or buggy workload forwarding the wrong user).
WORKLOAD_CASES: list[JwtCase] = [
    JwtCase("own user's id token with matching claim and header", _h(lambda c: c.token), Outcome.OK, "workload"),
    JwtCase("no token", _h(lambda c: None), Outcome.RBAC_403, "workload"),
    JwtCase("token in the access_token query parameter",
            lambda c: Sent(c.headers(None), f"/whoami?access_token={c.token}"), Outcome.RBAC_403, "workload"),
    JwtCase("x-auth-request-tenantid naming another tenant",
            _h(lambda c: c.token, header=lambda c: c.another_tenant), Outcome.RBAC_403, "workload"),
    JwtCase("own pool's user whose custom:tenantid names another tenant",
            _h(lambda c: issued(c.platform, c.tenant, "mallory")), Outcome.RBAC_403, "workload"),
    JwtCase("Cognito access token (no aud) instead of the id token",
            _h(lambda c: issued(c.platform, c.tenant, kind="access")), Outcome.AUTHN_403, "workload"),
    JwtCase("id token saying token_use access", _h(lambda c: c.sign(token_use="access")), Outcome.RBAC_403,
            "workload", needs=SIGN),
    JwtCase("expired token", _h(lambda c: c.sign(exp=tokens.now() - 3600, iat=tokens.now() - 7200)),
            Outcome.AUTHN_401, "workload", needs=SIGN),
    JwtCase("signed with a foreign key under the pool's kid", _h(lambda c: _foreign(c, kid=c.kid)),
            Outcome.AUTHN_401, "workload"),
    JwtCase("alg 'none' without signature", _h(lambda c: tokens.unsigned(c.jwt.header, c.jwt.payload)),
            Outcome.AUTHN_401, "workload"),
]


@dataclass(frozen=True)
class CrossCase:
    """A token from ``src``'s pool used against ``dst``."""

    name: str
    build: Callable[[Ctx, Tenant], Sent] = field(repr=False)
    expect: Outcome
    at: str = "gateway"
    needs: str | None = None

    def __str__(self) -> str:
        return f"{self.name} is {self.expect} at the {self.at}"


CROSS_CASES: list[CrossCase] = [
    CrossCase("other pool's user, header naming this tenant",
              lambda c, dst: Sent(c.headers(c.token, header=dst.name)), Outcome.RBAC_403),
    CrossCase("other pool's user, header naming its own tenant",
              lambda c, dst: Sent(c.headers(c.token)), Outcome.RBAC_403),
    # The issuer picks the provider, and the other pool's provider accepts only its own client.
    CrossCase("other pool's token re-minted for this tenant's app client and claim (same signing key)",
              lambda c, dst: Sent(c.headers(c.sign(aud=dst.client_id, **{"custom:tenantid": dst.name}),
                                            header=dst.name)),
              Outcome.AUTHN_403, needs=SIGN),
    CrossCase("other pool's token re-minted with this tenant's claim (same signing key)",
              lambda c, dst: Sent(c.headers(c.sign(**{"custom:tenantid": dst.name}), header=dst.name)),
              Outcome.RBAC_403, needs=SIGN),
    CrossCase("other pool's user sent by this tenant's own app-ui",
              lambda c, dst: Sent(c.headers(c.token, header=dst.name), "/whoami"), Outcome.AUTHN_401, "workload"),
]
