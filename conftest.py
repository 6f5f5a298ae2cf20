"""Session set-up shared by the harness's own tests (tests/) and the suites (suites/).

Options: ``--backend`` (env PLATFORM_BACKEND; default standalone), ``--platform-dir``
(another copy of platform/ to test), ``--keep`` (leave the run directory in place),
``--artifacts`` (where failure artifacts go). Cluster options (``--context``,
``--destructive``, ``--kind-cluster``, ``--cluster-attach``, ``--eks-users``):
fixtures/cluster/pytest_plugin.py. On a failed test the backend dumps
configs and logs into ``<artifacts>/<test id>/`` and the report says where.
``--run-json PATH`` writes the run for the conformance report (fixtures/report/plugin.py);
long steps show a progress line (fixtures/progress.py).
"""

from __future__ import annotations

import os
import re
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent
sys.path.insert(0, str(REPO))

from fixtures.platform import MissingCapability  # noqa: E402

pytest_plugins = ["fixtures.cluster.pytest_plugin", "fixtures.report.plugin", "fixtures.progress"]

BACKENDS = {
    "standalone": "fixtures.standalone.backend:StandalonePlatform",
    "kind": "fixtures.kind.backend:KindPlatform",  # needs Docker and `make cluster-tools`
    "eks": "fixtures.eks.backend:EksPlatform",  # an existing EKS cluster from the kube context
}


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("platform")
    group.addoption("--backend", default=os.environ.get("PLATFORM_BACKEND", "standalone"),
                    choices=sorted(BACKENDS), help="which backend runs the platform (env PLATFORM_BACKEND)")
    group.addoption("--platform-dir", default=str(REPO / "platform"), type=Path,
                    help="the copy of platform/ to stand up and test")
    group.addoption("--keep", action="store_true", default=False,
                    help="keep the run directory (configs, logs, certificates) after the run")
    group.addoption("--artifacts", default=str(REPO / "artifacts"), type=Path,
                    help="where failed tests' artifacts are written")


def _load(spec: str):
    module, _, attr = spec.partition(":")
    __import__(module)
    return getattr(sys.modules[module], attr)


@pytest.fixture(scope="session")
def platform(request: pytest.FixtureRequest):
    """The platform, up and healthy, on the chosen backend. Stopped (every process,
    port and temp dir) at the end of the session, even after failures."""
    cls = _load(BACKENDS[request.config.getoption("--backend")])
    from_pytest = getattr(cls, "from_pytest", None)  # cluster backends read their own options
    plat = (from_pytest(request.config) if from_pytest is not None
            else cls(Path(request.config.getoption("--platform-dir")), keep=request.config.getoption("--keep")))
    request.config._platform = plat  # for the artifact hook
    try:
        plat.start()
    except BaseException:
        request.config._platform = None
        raise
    try:
        yield plat
    finally:
        request.config._platform = None
        plat.close()
        request.config._platform_timings = {k: round(v, 2) for k, v in plat.timings.items()}


def pytest_generate_tests(metafunc: pytest.Metafunc) -> None:
    """``tenant`` and ``tenant_pair`` parameters come from the tenant catalog of the
    platform under test, so a tenant added by configuration grows every matrix."""
    wanted = {"tenant", "tenant_pair", "cross_tenant_pair"} & set(metafunc.fixturenames)
    if not wanted:
        return
    from fixtures.catalog import tenants

    catalog = tenants(str(Path(metafunc.config.getoption("--platform-dir")).resolve()))
    if "tenant" in wanted:
        metafunc.parametrize("tenant", catalog, ids=str)
    if "tenant_pair" in wanted:
        pairs = [(a, b) for a in catalog for b in catalog]
        metafunc.parametrize("tenant_pair", pairs, ids=[f"{a}->{b}" for a, b in pairs])
    if "cross_tenant_pair" in wanted:
        pairs = [(a, b) for a in catalog for b in catalog if a != b]
        metafunc.parametrize("cross_tenant_pair", pairs, ids=[f"{a}->{b}" for a, b in pairs])


@pytest.fixture
def requires(platform):
    """``requires("capability")`` skips the test with a reason naming what is missing."""
    def check(capability: str) -> None:
        try:
            platform.requires(capability)
        except MissingCapability as exc:
            pytest.skip(str(exc))
    return check


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    missing = call.excinfo.value if call.excinfo is not None else None
    if isinstance(missing, MissingCapability) and report.when in ("setup", "call"):
        # The backend cannot do what the test needs (a standalone-only fault on a cluster,
        # say): that is a skip with the backend's reason, not an error. On standalone a skip
        # still fails the run (below), so this never hides a gap there.
        path, line, _ = item.reportinfo()
        report.outcome = "skipped"
        report.longrepr = (str(path), (line or 0) + 1, f"Skipped: {missing}")
        report.sections.clear()
    plat = getattr(item.config, "_platform", None)
    if report.failed and plat is not None and report.when in ("call", "setup"):
        dest = Path(item.config.getoption("--artifacts")) / re.sub(r"[^A-Za-z0-9_.-]+", "_", item.nodeid)
        try:
            plat.dump(dest)
            report.sections.append(("artifacts", f"configs and logs of the platform: {dest}"))
        except Exception as exc:  # never hide the test's own failure behind a dump failure
            report.sections.append(("artifacts", f"dump failed: {exc!r}"))
    # Marked `cluster`: needs what only a cluster has (real IAM, say), so it may skip here.
    if (report.skipped and "suites" in Path(str(item.fspath)).parts and item.get_closest_marker("cluster") is None
            and item.config.getoption("--backend") == "standalone"):
        item.config._suite_skips = getattr(item.config, "_suite_skips", []) + [
            (item.nodeid, str(report.longrepr[-1]) if isinstance(report.longrepr, tuple) else str(report.longrepr))]
    return report


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A suite test that skips on standalone is a failure, unless it is marked ``cluster``."""
    skips = getattr(session.config, "_suite_skips", [])
    if skips and exitstatus == 0:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    skips = getattr(config, "_suite_skips", [])
    if skips:
        terminalreporter.section("suites skipped on standalone (counted as failures)", red=True)
        for nodeid, reason in skips:
            terminalreporter.line(f"{nodeid}: {reason}")
    plat_timings = getattr(config, "_platform_timings", None)
    if plat_timings:
        terminalreporter.line(f"platform timings: {plat_timings}")
