"""fixtures/tokens.py builds exactly the tokens it claims to: real signatures where a key is
given (checked with PyJWT), the broken forms byte for byte, and an attacker JWKS that
records whoever fetches it."""

from __future__ import annotations

import hashlib
import hmac
import json
import urllib.request

import jwt
import pytest

from fixtures import tokens
from fixtures.platform import Tenant

CLAIMS = {"iss": "https://issuer.example", "aud": "client", "token_use": "id", "custom:tenantid": "tenanta"}


def test_parse_and_encode_keep_the_original_bytes():
    token = tokens.rs256({"kid": "k"}, CLAIMS, tokens.foreign_key())
    parsed = tokens.Jwt.parse(token)
    assert parsed.encode() == token
    assert parsed.header == {"kid": "k", "alg": "RS256"} and parsed.payload == CLAIMS
    edited = parsed.with_claims(**{"custom:tenantid": "tenantb", "aud": None})
    assert edited.payload == {"iss": "https://issuer.example", "token_use": "id", "custom:tenantid": "tenantb"}
    assert edited.signature == parsed.signature  # the signature is kept: it no longer covers the claims
    assert edited.encode().split(".")[0] == token.split(".")[0]
    assert edited.encode().split(".")[1] != token.split(".")[1]


def test_rs256_is_a_valid_signature_of_the_given_key():
    key = tokens.foreign_key()
    token = tokens.rs256({"kid": "k"}, CLAIMS, key)
    assert jwt.decode(token, key.public_key(), algorithms=["RS256"], audience="client") == CLAIMS
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, tokens.foreign_key("someone else").public_key(), algorithms=["RS256"], audience="client")


def test_hs256_is_a_valid_hmac_of_the_given_secret():
    secret = b"0123456789abcdef0123456789abcdef"
    token = tokens.hs256({}, CLAIMS, secret)
    assert jwt.decode(token, secret, algorithms=["HS256"], audience="client") == CLAIMS


def test_confusion_secrets_key_an_hmac_with_the_public_key():
    key = tokens.foreign_key()
    jwk = tokens.public_jwk(key, "k")
    secrets = tokens.confusion_secrets(key.public_key(), jwk)
    assert secrets["PEM"].startswith(b"-----BEGIN PUBLIC KEY-----") and secrets["PEM"].endswith(b"\n")
    assert not secrets["PEM without trailing newline"].endswith(b"\n")
    token = tokens.hs256({"kid": "k"}, CLAIMS, secrets["PEM"])
    signing_input, sig = token.rsplit(".", 1)
    assert tokens.b64url_decode(sig) == hmac.new(secrets["PEM"], signing_input.encode(), hashlib.sha256).digest()


@pytest.mark.parametrize("alg", tokens.ALG_NONE_SPELLINGS)
def test_unsigned_tokens_carry_the_alg_and_no_signature(alg):
    token = tokens.unsigned({"kid": "k", "alg": "RS256"}, CLAIMS, alg=alg)
    header, payload, sig = token.split(".")
    assert json.loads(tokens.b64url_decode(header))["alg"] == alg
    assert json.loads(tokens.b64url_decode(payload)) == CLAIMS
    assert sig == ""
    assert tokens.unsigned({}, CLAIMS, signature=b"\x01\x02").endswith(".AQI")


def test_public_jwk_round_trips_through_a_jwks():
    key = tokens.foreign_key()
    keys = {"keys": [{"kty": "EC", "kid": "other"}, tokens.public_jwk(key, "mine")]}
    assert tokens.public_key_from_jwks(keys, "mine").public_numbers() == key.public_key().public_numbers()
    with pytest.raises(AssertionError, match="no RSA key with kid 'missing'"):
        tokens.public_key_from_jwks(keys, "missing")


def test_b64url_decode_is_strict():
    assert tokens.b64url_decode(tokens.b64url(b"\xff\xfe")) == b"\xff\xfe"
    for bad in ("a+b", "a/b", "a b", "a.b"):
        with pytest.raises(ValueError):
            tokens.b64url_decode(bad)


def test_jwks_url_is_the_emulators_when_there_is_one():
    t = Tenant("t", "t.example.com", "us-east-1", "t-users", "us-east-1_abc", "c",
               "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_abc",
               "https://cognito-idp.us-east-1.amazonaws.com/us-east-1_abc/.well-known/jwks.json")

    class Idp:
        tenant = t
        endpoint = "http://127.0.0.1:5000"

    assert tokens.jwks_url(Idp()) == "http://127.0.0.1:5000/us-east-1_abc/.well-known/jwks.json"
    Idp.endpoint = None
    assert tokens.jwks_url(Idp()) == t.jwks_uri


def test_attacker_jwks_server_records_fetches_and_closes():
    keys = {"keys": [tokens.public_jwk(tokens.foreign_key(), "attacker")]}
    with tokens.JwksServer.running(keys) as srv:
        assert srv.url.startswith("http://127.0.0.1:")
        with urllib.request.urlopen(srv.url, timeout=5) as resp:  # noqa: S310 - loopback
            assert json.loads(resp.read()) == keys
        assert srv.fetches == ["/.well-known/jwks.json"]
    with pytest.raises(OSError):
        urllib.request.urlopen(srv.url, timeout=2)  # noqa: S310 - loopback, closed
