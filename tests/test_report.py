"""The conformance report: facts recorded by tests reach run.json through the plugin, and
the page rendered from it shows every cell the tenant catalog implies, in a real browser.

The browser is headless Chromium (Debian package ``chromium``, installed by
``make system-deps``); without it the browser tests fail and say how to install it.
"""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import tempfile
import urllib.parse
import urllib.request
import zlib
from html.parser import HTMLParser
from pathlib import Path

import pytest

from fixtures import istio_gate
from fixtures.diagnose import Exchange
from fixtures.flagger import Phase
from fixtures.platform import CallResult, Outcome
from fixtures.report import FACTS, MESH_APPS, record, tls_reason
from fixtures.report.render import ReportError, load_run, render

REPO = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
TENANTS = ["tenanta", "tenantb", "tenantc"]   # three: the matrix must grow with the catalog
NOT_RUN = {("outside-plaintext", "tenantc/app-ui"), ("tenantc/rag-api", "tenanta/rag-api")}
FAILED_ID = "suites/isolation/test_east_west.py::test_workload_to_workload[tenantb->tenanta-rag-api calls rag-api]"
DUMP = "suites_isolation_test_east_west.py_test_workload_to_workload_tenantb-_tenanta-rag-api_calls_rag-api_"


def cells_for(n: int) -> int:
    """The call matrix of suites/isolation/test_east_west.py for n tenants."""
    return 4 * n * n + 6 * n


# -- a synthetic run ---------------------------------------------------------------------------

def _png(path: Path) -> Path:
    """A 2x2 RGB PNG (a real image the browser decodes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    raw = b"".join(b"\x00" + bytes([200, 30, 30, 30, 200, 30]) for _ in range(2))
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
                     + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    return path


def _test(nodeid: str, outcome: str = "passed", facts: list | None = None, **extra) -> dict:
    return {"nodeid": nodeid, "outcome": outcome, "duration_s": 0.5, "phases": {}, "message": "", "longrepr": "",
            "artifacts": None, "artifacts_note": "", "facts": facts or [], **extra}


def _reach(caller: str, target: str, expected: str, got: str, reason: str = "") -> dict:
    return {"kind": "reachability", "caller": caller, "target": target, "expected": expected,
            "result": {"outcome": got, "status": 200 if got == "OK" else None, "reason": reason}}


def synthetic_run(root: Path) -> Path:
    """reports/run.json of a three-tenant run with one failed test (artifacts dumped),
    two cells nobody recorded, JWT, PROXY, rollout and RAG facts, and gate verdicts."""
    reports, artifacts = root / "reports", root / "artifacts"
    reports.mkdir(parents=True)
    apps = [f"{t}/{a}" for t in TENANTS for a in MESH_APPS]
    tests = []
    for caller in apps + ["gateway", "outside-tls", "outside-plaintext"]:
        for target in apps:
            if (caller, target) in NOT_RUN:
                continue
            same = caller.split("/")[0] == target.split("/")[0] or caller == "gateway"
            want = "OK" if same else ("RESET" if caller == "outside-plaintext" else "TLS_REFUSED")
            fact = _reach(caller, target, want, want, "UNKNOWN_CA" if want == "TLS_REFUSED" else "")
            tests.append(_test(f"suites/isolation/test_east_west.py::t[{caller}->{target}]", facts=[fact]))
    dump = artifacts / DUMP
    dump.mkdir(parents=True)
    (dump / "config_dump.tenanta.rag-api.json").write_text("{}")
    failed = next(t for t in tests if t["facts"][0]["caller"] == "tenantb/rag-api"
                  and t["facts"][0]["target"] == "tenanta/rag-api")
    failed.update(nodeid=FAILED_ID, outcome="failed", message="AssertionError: expected TLS refused, got allowed",
                  longrepr="E   AssertionError: expected ...", artifacts=str(dump))
    failed["facts"][0]["result"] = {"outcome": "OK", "status": 200, "reason": ""}
    for t in TENANTS:
        tests.append(_test(f"suites/isolation/test_jwt.py::gw[{t}]", facts=[
            {"kind": "jwt", "tenant": t, "case": "no token", "at": "gateway", "expected": "RBAC_403",
             "expected_at": "gateway", "result": {"outcome": "RBAC_403"},
             "decided_at": "workload" if t == "tenantc" else "gateway"},   # tenantc's edge let it through
            {"kind": "jwt", "tenant": t, "case": "expired token", "at": "workload", "expected": "AUTHN_401",
             "result": {"outcome": "AUTHN_401"}}]))
    tests.append(_test("suites/ingress/test_proxy_protocol.py::bad[v2 with a bad signature]", facts=[
        {"kind": "proxy_protocol", "group": "malformed", "case": "v2 with a bad signature", "tenant": "tenanta",
         "expected": "connection closed, nothing forwarded",
         "got": {"outcome": "connection closed by the gateway before any response"}}]))
    timeline = reports / "rollout-a_healthy_version.json"
    timeline.write_text(json.dumps({"timeline": [{"t": 0}, {"t": 2}]}))
    tests.append(_test("suites/rollout/test_canary_scenarios.py::test_canary_rollout[healthy]", facts=[
        {"kind": "rollout", "canary": "tenanta/rag-api", "version": "v2-healthy", "phase": "Succeeded",
         "timeline": str(timeline), "png": str(_png(reports / "rollout-a_healthy_version.png"))}]))
    tests.append(_test("suites/rag/test_tenant_routing.py::recall", facts=[
        {"kind": "rag_recall", "tenant": t, "recall": r, "k": 5, "questions": 20}
        for t, r in zip(TENANTS, (1, .9, .85))]))
    tests.append(_test("suites/isolation/test_drift.py::skipped", "skipped", message="needs aws"))
    counts: dict[str, int] = {}
    for t in tests:
        counts[t["outcome"]] = counts.get(t["outcome"], 0) + 1
    platform_dir = str(root / "platform")
    run = {"schema": 1, "started_at": "2026-01-01T00:00:00+00:00", "finished_at": "2026-01-01T00:05:00+00:00",
           "duration_s": 300.0, "exit_status": 1, "command": "pytest suites", "backend": "standalone",
           "platform_dir": platform_dir, "junit_xml": str(reports / "junit.xml"), "tenants": TENANTS,
           "catalog_error": "", "matrix": {"apps": list(MESH_APPS), "callers_outside_mesh": {
               "gateway": "ingress gateway", "outside-tls": "outside, TLS", "outside-plaintext": "outside, plaintext"}},
           "environment": {"python": "3.11", "pytest": "9", "istio_crds": ["1.28.10"], "backend_name": "standalone",
                           "envoy": {"gateway": "1.40.0", "sidecars": "1.40.0", "proxies": 7, "source": "/server_info"},
                           "prometheus": {"version": "2.42.0"}},
           "platform_timings": {"up_s": 30.0}, "suite_skips": [], "counts": counts, "tests": tests}
    gate = reports / "istio-gate"
    results = [istio_gate.Result("envoy", "PASS", "ok"), istio_gate.Result("configs", "FAIL", "Envoy 1.36 rejects x")]
    istio_gate.write_verdict(gate, istio_gate.istio_target("1.28"), results, Path(platform_dir))
    istio_gate.write_verdict(gate, istio_gate.envoy_target("1.39"), results[:1], root / "elsewhere")
    (reports / "run.json").write_text(json.dumps(run))
    return reports / "run.json"


class Elements(HTMLParser):
    """Every start tag with its attributes, in document order."""

    def __init__(self, text: str) -> None:
        super().__init__()
        self.tags: list[tuple[str, dict[str, str | None]]] = []
        self.feed(text)

    def handle_starttag(self, tag, attrs) -> None:
        self.tags.append((tag, dict(attrs)))

    def having(self, attr: str, value: str | None = None) -> list[dict]:
        return [a for _, a in self.tags if attr in a and (value is None or a[attr] == value)]


# -- the page, from the synthetic run -----------------------------------------------------------

def test_page_shows_every_cell_the_catalog_implies(tmp_path):
    html, md = render(synthetic_run(tmp_path))
    page = Elements(html.read_text())
    cells = page.having("data-cell", "reachability")
    assert len(cells) == cells_for(len(TENANTS)) == 54
    assert {(c["data-caller"], c["data-target"]) for c in cells if c["data-outcome"] == "NOT_RUN"} == NOT_RUN
    unexpected = [c for c in cells if "unexpected" in c["class"].split()]
    assert [(c["data-caller"], c["data-target"]) for c in unexpected] == [("tenantb/rag-api", "tenanta/rag-api")]
    # 6 workloads x 4 other tenants' targets, less the cell not run and the failed one; 6 outside over TLS
    assert sum(1 for c in cells if c["data-outcome"] == "TLS_REFUSED") == 24 - 2 + 6
    jwt = Elements(html.read_text())
    assert len(jwt.having("data-jwt")) == 2 * len(TENANTS)
    assert "UNEXPECTED denied: RBAC 403 at the workload" in md.read_text()   # refused, but by the wrong proxy
    text = md.read_text()
    assert text.count("UNEXPECTED") == 2 and "9 callers x 6 targets = 54 cells" in text
    assert all(f"## JWT cases: {t}" in text for t in TENANTS)
    assert "| tenantc | 0.850 | 5 | 20 | passed |" in text


def test_page_is_self_contained_and_keeps_the_gate_of_this_platform_only(tmp_path):
    html, _ = render(synthetic_run(tmp_path))
    page = html.read_text()
    tags = Elements(page)
    images = tags.having("src")
    assert len(images) == 1 and images[0]["src"].startswith("data:image/png;base64,")   # the timeline, embedded
    assert not [t for t, _ in tags.tags if t in ("script", "link")]   # no script, no external stylesheet
    gate = [t for t in tags.having("data-table", "gate")]
    assert len(gate) == 1 and "Istio 1.28" in page and "Envoy 1.36 rejects x" in page
    assert "verdict-envoy-1.39.json: platform" in page      # another platform copy's verdict is not shown


def test_failed_test_links_its_artifacts(tmp_path):
    html, md = render(synthetic_run(tmp_path))
    page = Elements(html.read_text())
    failed = page.having("data-failed")
    assert [f["data-failed"] for f in failed] == [FAILED_ID]
    links = page.having("data-artifacts")
    assert len(links) == 1
    target = (html.parent / urllib.parse.unquote(links[0]["href"])).resolve()
    assert target == tmp_path / "artifacts" / DUMP
    assert links[0]["href"].startswith("../artifacts/")      # relative: the folder can be moved or archived
    assert f"](../artifacts/{DUMP}/)" in md.read_text()


# -- the page in a real browser ------------------------------------------------------------------

def chromium(*args: str, timeout: float = 90) -> subprocess.CompletedProcess:
    """Headless Chromium on a fresh profile; its whole process group is killed afterwards."""
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(f"{CHROMIUM} not found: the report's browser tests need Debian's `chromium` "
                    "(apt-get install -y --no-install-recommends chromium; `make system-deps`)")
    with tempfile.TemporaryDirectory(prefix="report-chromium-") as profile:
        proc = subprocess.Popen([str(CHROMIUM), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()
            raise AssertionError(f"chromium {' '.join(args)} did not finish within {timeout}s") from None
        finally:
            try:
                os.killpg(proc.pid, signal.SIGKILL)   # helpers (zygote, utility) that outlived the browser
            except ProcessLookupError:
                pass
    assert proc.returncode == 0, f"chromium exited {proc.returncode}: {err[-2000:]}"
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def test_browser_renders_the_matrix_and_the_artifact_link(tmp_path):
    html, _ = render(synthetic_run(tmp_path))
    dom = chromium("--dump-dom", html.as_uri()).stdout
    page = Elements(dom)
    assert page.having("data-verdict"), dom[:500]
    assert len(page.having("data-cell", "reachability")) == cells_for(len(TENANTS))
    matrix = page.having("data-matrix", "reachability")
    assert [m["data-cells"] for m in matrix] == [str(cells_for(len(TENANTS)))]
    link = page.having("data-artifacts")[0]["href"]
    resolved = Path(urllib.request.url2pathname(urllib.parse.urlparse(urllib.parse.urljoin(html.as_uri(), link)).path))
    assert (resolved / "config_dump.tenanta.rag-api.json").is_file(), resolved


def test_browser_paints_the_colours_and_the_embedded_image(tmp_path):
    from PIL import Image

    html, _ = render(synthetic_run(tmp_path))
    shot = tmp_path / "shot.png"
    chromium(f"--screenshot={shot}", "--window-size=1400,3000", "--hide-scrollbars", html.as_uri())
    with Image.open(shot) as img:
        colours = {c for _, c in img.convert("RGB").getcolors(maxcolors=1 << 20)}
    # allowed, TLS refused, reset, failed badge (CSS inline and applied), the PNG's red pixel
    for rgb in ((0xc8, 0xe6, 0xc9), (0xbb, 0xde, 0xfb), (0xd7, 0xcc, 0xc8), (0xff, 0xcd, 0xd2), (200, 30, 30)):
        assert rgb in colours, f"{rgb} not painted"


# -- the plugin, in a real pytest session ---------------------------------------------------------

SAMPLE = '''
import pytest
from fixtures.platform import CallResult, Outcome
from fixtures.report import record


class Dumping:
    """What the root conftest's failure hook calls: writes one artifact."""
    def dump(self, dest):
        dest.mkdir(parents=True, exist_ok=True)
        (dest / "config_dump.json").write_text("{}")


@pytest.fixture
def dumping(request):
    request.config._platform = Dumping()
    yield
    request.config._platform = None


@pytest.fixture
def at_teardown(record_fact):
    yield
    record_fact("rag_recall", {"tenant": "tenanta", "k": 3, "recall": 0.75, "questions": 12})


def test_allowed(request, at_teardown):
    res = CallResult("GET /whoami", status=200)
    record(request.node, "reachability", caller="tenanta/app-ui", target="tenanta/rag-api",
           expected=Outcome.OK, result=res)
    res.expect(Outcome.OK)


def test_refused_but_allowed(request, dumping):
    res = CallResult("GET /whoami", status=200)
    record(request.node, "reachability", caller="tenantb/app-ui", target="tenanta/rag-api",
           expected=Outcome.TLS_REFUSED, result=res)
    res.expect(Outcome.TLS_REFUSED)


def test_skipped():
    pytest.skip("nothing to see")
'''


def test_plugin_writes_outcomes_facts_and_artifacts_of_a_real_session(tmp_path):
    (tmp_path / "test_sample.py").write_text(SAMPLE)
    run_json = tmp_path / "reports" / "run.json"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.run([sys.executable, "-m", "pytest", "test_sample.py", "-q", "-p", "no:cacheprovider",
                           "-W", "error", "-p", "conftest", "-p", "fixtures.report.plugin",
                           f"--run-json={run_json}", f"--artifacts={tmp_path / 'artifacts'}",
                           f"--junitxml={tmp_path / 'reports' / 'junit.xml'}", "--rootdir", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1, proc.stdout + proc.stderr      # pytest's own exit status, unchanged
    run = load_run(run_json)
    assert run["counts"] == {"passed": 1, "failed": 1, "skipped": 1}
    assert run["tenants"] == ["tenanta", "tenantb"]            # the repository's catalog
    by = {t["nodeid"].split("::")[1]: t for t in run["tests"]}
    assert [f["kind"] for f in by["test_allowed"]["facts"]] == ["reachability", "rag_recall"]   # teardown kept
    bad = by["test_refused_but_allowed"]
    assert bad["facts"][0]["result"]["outcome"] == "OK" and bad["facts"][0]["expected"] == "TLS_REFUSED"
    assert "expected denied: TLS handshake refused" in bad["message"]
    assert Path(bad["artifacts"]) == tmp_path / "artifacts" / "test_sample.py_test_refused_but_allowed"
    assert (Path(bad["artifacts"]) / "config_dump.json").is_file()
    assert by["test_skipped"]["message"].endswith("nothing to see")
    html, md = render(run_json)
    links = Elements(html.read_text()).having("data-artifacts")
    assert [urllib.parse.unquote(a["href"]) for a in links] == ["../artifacts/test_sample.py_test_refused_but_allowed/"]
    assert "| tenanta | 0.750 | 3 | 12 | passed |" in md.read_text()


def test_matrix_axes_agree_with_the_isolation_suite():
    from suites.isolation.probes import APPS

    assert tuple(MESH_APPS) == tuple(APPS)
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                           "suites/isolation/test_east_west.py"], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    collected = [ln for ln in proc.stdout.splitlines() if "::" in ln]
    assert len(collected) == cells_for(2)   # the repository's two tenants: one test per cell


# -- recording, and what it refuses ----------------------------------------------------------------

@pytest.fixture
def node(request):
    """This test's node; facts recorded on it are dropped afterwards (they are not this run's)."""
    yield request.node
    request.node.stash[FACTS] = []


def test_record_stores_what_came_back(node):
    res = CallResult("GET /", status=503, headers={"x-mesh-upstream-failure":
                     "TLS_error:|268436504:SSL_routines:OPENSSL_internal:TLSV1_ALERT_UNKNOWN_CA:TLS_error_end"})
    fact = record(node, "reachability", caller="a/b", target="c/d", expected=Outcome.TLS_REFUSED, result=res,
                  note=float("nan"))
    assert fact["expected"] == "TLS_REFUSED" and fact["note"] is None
    assert fact["result"]["outcome"] == "TLS_REFUSED" and fact["result"]["reason"] == "UNKNOWN_CA"
    ex = Exchange(sent="x", stage="tls", ended="closed", detail="EOF")
    fact = record(node, "proxy_protocol", group="g", case="c", expected="closed", got=ex, phase=Phase.FAILED)
    assert fact["got"]["outcome"] == "TLS handshake failed, connection closed by the gateway"
    assert fact["phase"] == "Failed"
    assert json.dumps(node.stash[FACTS])


@pytest.mark.parametrize("kind, fields, error", [
    ("reachabilty", {}, "unknown report fact kind 'reachabilty'"),
    ("reachability", {"caller": "a", "target": "b"}, "missing expected, result"),
    ("rag_recall", {"tenant": "a", "recall": 1.5}, "recall must be a number in [0, 1]"),
    ("rag_recall", {"tenant": "a", "recall": 0.5, "extra": object()}, "cannot store a object"),
], ids=["unknown kind", "missing fields", "recall out of range", "value that is not JSON"])
def test_record_refuses_bad_facts(node, kind, fields, error):
    with pytest.raises((ValueError, TypeError), match=error.replace("[", r"\[").replace("]", r"\]")):
        record(node, kind, **fields)
    assert node.stash.get(FACTS, []) == []


def test_record_needs_a_test_node(request):
    with pytest.raises(TypeError, match="report facts belong to a test"):
        record(request.session, "rag_recall", tenant="a", recall=1.0)


def test_tls_reason_reads_envoy_and_python_errors():
    assert tls_reason("TLS_error:|268436504:SSL_routines:OPENSSL_internal:TLSV1_ALERT_UNKNOWN_CA:TLS_error_end") \
        == "UNKNOWN_CA"
    assert tls_reason("SSLError: [SSL: TLSV13_ALERT_CERTIFICATE_REQUIRED] tlsv13 alert certificate required") \
        == "CERTIFICATE_REQUIRED"
    assert tls_reason("ConnectionResetError: [Errno 104] Connection reset by peer") == ""


def test_cli_says_what_is_wrong_with_the_run_record(tmp_path):
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "fixtures.report", *args], cwd=REPO, capture_output=True,
                              text=True, timeout=60)
    missing = cli(str(tmp_path / "run.json"))
    assert missing.returncode == 2 and "no run record" in missing.stderr and "make conformance" in missing.stderr
    (tmp_path / "run.json").write_text(json.dumps({"schema": 99}))
    wrong = cli(str(tmp_path / "run.json"))
    assert wrong.returncode == 2 and "not a run record of schema 1" in wrong.stderr
    with pytest.raises(ReportError, match="not JSON"):
        (tmp_path / "bad.json").write_text("{")
        load_run(tmp_path / "bad.json")
    good = cli(str(synthetic_run(tmp_path / "ok")), "--out", str(tmp_path / "out"))
    assert good.returncode == 0, good.stderr
    assert (tmp_path / "out" / "report.html").is_file() and (tmp_path / "out" / "report.md").is_file()


@pytest.mark.slow
def test_report_of_a_real_run_shows_every_cell_measured(tmp_path):
    """The call-matrix suite, run for real on the standalone platform, renders a page that
    Chromium shows with one measured cell per caller x target of the catalog, none 'not run'."""
    from fixtures.catalog import tenants

    run_json = tmp_path / "run.json"
    proc = subprocess.run([sys.executable, "-m", "pytest", "suites/isolation/test_east_west.py", "-q",
                           "-p", "no:cacheprovider", f"--run-json={run_json}",
                           f"--artifacts={tmp_path / 'artifacts'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    html, _ = render(run_json, out_dir=tmp_path / "reports")
    page = Elements(chromium("--dump-dom", html.as_uri()).stdout)
    n = len(tenants(str(REPO / "platform")))
    cells = page.having("data-cell", "reachability")
    assert len(cells) == cells_for(n), f"{len(cells)} cells for {n} tenants"
    assert [c for c in cells if c["data-outcome"] == "NOT_RUN"] == []
    assert not [c for c in cells if "unexpected" in c["class"].split()]
