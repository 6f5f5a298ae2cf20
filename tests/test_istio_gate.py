"""The Istio upgrade gate catches what an upgrade breaks, and only where it breaks.

The planted incompatibility is a real one: the gateway's ``sidecar.istio.io/bootstrapOverride``
(a ConfigMap with ``custom_bootstrap.json``, merged into the bootstrap as Istio's agent
does) sets ``admin.allow_paths``, a field Envoy 1.37 added. Envoy 1.36 (Istio 1.28)
rejects it; 1.37 and 1.38 (Istio 1.29, 1.30) accept it. The gate must fail for 1.28 only
and quote Envoy's error.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fixtures import envoy_versions, istio_gate
from fixtures.standalone.backend import StandalonePlatform
from fixtures.standalone.subset import UnsupportedField

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"
OVERRIDE = "sidecar.istio.io/bootstrapOverride"
PLANTED = {"admin": {"allow_paths": [{"prefix": "/"}]}}   # Envoy >= 1.37 only


@pytest.fixture(scope="module")
def envoys() -> dict[str, Path]:
    """The cached Envoys of Istio 1.28, 1.29, 1.30 (installed into the cache if missing)."""
    return envoy_versions.install(["1.36", "1.37", "1.38"])


def _copy(tmp_path: Path) -> Path:
    dest = tmp_path / "platform"
    shutil.copytree(PLATFORM, dest, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest


def _plant(copy: Path, custom_bootstrap: dict | str | None = PLANTED, *, configmap: str = "gateway-bootstrap") -> None:
    """Annotate the gateway with a bootstrap override and add its ConfigMap (unless None)."""
    gw_file = copy / "mesh" / "gateway" / "ingress-gateway.yaml"
    docs = list(yaml.safe_load_all(gw_file.read_text()))
    deployment = next(d for d in docs if d["kind"] == "Deployment")
    deployment["spec"]["template"]["metadata"]["annotations"][OVERRIDE] = "gateway-bootstrap"
    gw_file.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    if custom_bootstrap is None:
        return
    data = {"custom_bootstrap.json": custom_bootstrap if isinstance(custom_bootstrap, str)
            else json.dumps(custom_bootstrap)}
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": configmap, "namespace": "istio-system"},
          "data": data}
    (copy / "mesh" / "gateway" / "bootstrap-override.yaml").write_text(yaml.safe_dump(cm))
    kust = copy / "mesh" / "gateway" / "kustomization.yaml"
    k = yaml.safe_load(kust.read_text())
    k["resources"].append("bootstrap-override.yaml")
    kust.write_text(yaml.safe_dump(k, sort_keys=False))


def _gate(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fixtures.istio_gate", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=600)


# -- the override itself ---------------------------------------------------------------------

def test_bootstrap_override_is_merged_into_the_gateway_bootstrap(tmp_path):
    copy = _copy(tmp_path)
    _plant(copy, {"admin": {"allow_paths": [{"prefix": "/"}]},
                  "layered_runtime": {"layers": [{"name": "extra", "static_layer": {"x": 1}}]}})
    plat = StandalonePlatform(copy).prepare()
    try:
        gw = plat.bootstraps[plat.model.gateway_workload.key]
        assert gw["admin"]["allow_paths"] == [{"prefix": "/"}]
        assert gw["admin"]["address"]["socket_address"]["port_value"]   # merged into, not replaced
        assert [layer["name"] for layer in gw["layered_runtime"]["layers"]][-1] == "extra"  # appended
        sidecars = [b for k, b in plat.bootstraps.items() if k != plat.model.gateway_workload.key]
        assert sidecars and not any("allow_paths" in b["admin"] for b in sidecars)
    finally:
        plat.close()


@pytest.mark.parametrize("custom, names", [
    (None, ("Deployment istio-system/istio-ingressgateway", f"[{OVERRIDE}]", "ConfigMap istio-system/gateway-bootstrap not found")),
    ("{not json", ("ConfigMap istio-system/gateway-bootstrap", "data.custom_bootstrap.json", "not valid JSON")),
    ("[1, 2]", ("ConfigMap istio-system/gateway-bootstrap", "data.custom_bootstrap.json", "JSON object")),
], ids=["ConfigMap missing", "not JSON", "not an object"])
def test_bad_bootstrap_override_is_refused_naming_resource_and_field(tmp_path, custom, names):
    copy = _copy(tmp_path)
    _plant(copy, custom)
    with pytest.raises(UnsupportedField) as err:
        StandalonePlatform(copy).prepare()
    for name in names:
        assert name in str(err.value)


# -- the gate ------------------------------------------------------------------------------------

def test_gate_passes_the_platform_as_it_is(envoys):
    res = _gate("--istio", "1.28", "--checks", "envoy,crds,configs")
    assert res.returncode == 0, res.stdout + res.stderr
    assert "PASS  configs" in res.stdout and "verdict: PASS" in res.stdout, res.stdout


@pytest.mark.slow
def test_planted_incompatibility_fails_the_gate_for_that_version_only(envoys, tmp_path):
    copy = _copy(tmp_path)
    _plant(copy)
    # The suites would need minutes where the configs pass; where they fail, the gate skips them.
    outputs = {istio: _gate("--istio", istio, "--platform-dir", str(copy), "--checks",
                            "envoy,crds,configs" + (",suites" if istio == "1.28" else ""))
               for istio in ("1.28", "1.29", "1.30")}
    old = outputs["1.28"]
    assert old.returncode == 1, old.stdout + old.stderr
    assert "FAIL  configs" in old.stdout and "verdict: FAIL" in old.stdout, old.stdout
    # Envoy's own words, quoted, naming the proxy and the field.
    assert "istio-system/istio-ingressgateway" in old.stdout, old.stdout
    assert "no such field: 'allow_paths'" in old.stdout, old.stdout
    # A platform Envoy rejects is not stood up: the suites are skipped with the reason.
    assert "SKIP  suites   not run: configs failed" in old.stdout, old.stdout
    for istio in ("1.29", "1.30"):
        res = outputs[istio]
        assert res.returncode == 0, f"Istio {istio}:\n{res.stdout}{res.stderr}"
        assert "PASS  configs" in res.stdout, res.stdout


def test_gate_names_a_missing_envoy_and_how_to_get_it(tmp_path, monkeypatch):
    monkeypatch.setenv("ENVOY_CACHE", str(tmp_path / "empty-cache"))
    result = istio_gate.check_envoy(istio_gate.istio_target("1.29"))
    assert result.status == "FAIL" and "make envoy-cache" in result.summary, result


def test_istio_minor_maps_to_its_envoy_and_the_previous_one_for_skew():
    assert istio_gate.istio_target("1.29") == istio_gate.Target(envoy="1.37", istio="1.29", skew_from="1.36")
    assert istio_gate.istio_target("1.30.3") == istio_gate.Target(envoy="1.38", istio="1.30", skew_from="1.37")
    # Istio 1.27's Envoy 1.35 has no wheel: no skew for 1.28.
    assert istio_gate.istio_target("1.28").skew_from is None
    with pytest.raises(ValueError, match="Istio 1.31"):
        istio_gate.istio_target("1.31")


def test_envoy_error_is_quoted_without_the_log_prefix():
    out = ("[2026-11-26 07:23:56.294][21036][critical][main] [source/server/config_validation/server.cc:76] "
           "error initializing configuration '/x.json': Protobuf message (type envoy.config.bootstrap.v3.Bootstrap "
           "reason INVALID_ARGUMENT: invalid JSON ... no such field: 'allow_paths') has unknown fields\n")
    quoted = istio_gate.envoy_error(out)
    assert quoted.startswith("error initializing configuration '/x.json'") and "allow_paths" in quoted
