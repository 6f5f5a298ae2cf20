"""The mutant catalog is usable without starting a platform: it loads, covers every area,
each mutant applies and really changes the rendered platform (in a way the API server and
the standalone backend accept), and every test it names exists. The runner's verdicts are
checked on made-up JUnit reports."""

from __future__ import annotations

import functools
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import yaml

from fixtures.manifests import render
from fixtures.mutants import catalog
from fixtures.mutants.catalog import AREAS, CatalogError, Kill, Mutant, Step, load, prepare
from fixtures.mutants.runner import JunitReport, PytestRun, Verdict, control_problems, judge, parse_junit

REPO = Path(__file__).resolve().parents[1]
MUTANTS = load()


@functools.cache
def baseline() -> tuple[dict, ...]:
    return tuple(render(catalog.PLATFORM, catalog.OVERLAY))


# -- the catalog as data -------------------------------------------------------------------------

def test_catalog_is_large_and_covers_every_area() -> None:
    assert len(MUTANTS) >= 25, f"only {len(MUTANTS)} mutants"
    assert {m.area for m in MUTANTS} == set(AREAS)
    ids = [m.id for m in MUTANTS]
    assert len(ids) == len(set(ids))


GOOD = {"id": "x-y", "area": "isolation", "description": "an engineer did something wrong here",
        "transform": [{"edit": {"file": "a", "old": "b", "new": "c"}}], "run": ["suites/isolation/test_jwt.py"],
        "kill": [{"test": "t", "reason": "r"}]}

REFUSED = [
    ("an unknown field", {**GOOD, "severity": "high"}, "mutant x-y: unknown field 'severity'"),
    ("an unknown area", {**GOOD, "area": "billing"}, "mutant x-y.area: 'billing'"),
    ("a bad id", {**GOOD, "id": "Bad_Id"}, "mutants[0].id: 'Bad_Id'"),
    ("no kill", {**GOOD, "kill": []}, "mutant x-y.kill"),
    ("a kill without reason", {**GOOD, "kill": [{"test": "t"}]}, "mutant x-y.kill[0]"),
    ("a reason that is no regex", {**GOOD, "kill": [{"test": "t", "reason": "("}]}, "kill[0].reason: not a regular"),
    ("a run that is no node id", {**GOOD, "run": ["-k", "jwt"]}, "mutant x-y.run"),
    ("an unknown step", {**GOOD, "transform": [{"sed": "s/a/b/"}]}, "mutant x-y.transform[0]: a step is one of"),
    ("a step missing a field", {**GOOD, "transform": [{"edit": {"file": "a", "new": "c"}}]},
     "mutant x-y.transform[0].edit.old: required"),
    ("a one-word description", {**GOOD, "description": "oops"}, "mutant x-y.description"),
]


@pytest.mark.parametrize("raw,names", [(r, n) for _, r, n in REFUSED], ids=[w for w, _, _ in REFUSED])
def test_catalog_loader_refuses(raw: dict, names: str, tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"mutants": [raw]}))
    with pytest.raises(CatalogError) as err:
        load(path)
    assert names in str(err.value)


def test_catalog_loader_refuses_a_duplicate_id(tmp_path: Path) -> None:
    path = tmp_path / "catalog.yaml"
    path.write_text(yaml.safe_dump({"mutants": [GOOD, GOOD]}))
    with pytest.raises(CatalogError, match="mutant x-y: the id is used twice"):
        load(path)
    path.write_text(yaml.safe_dump({"mutants": [GOOD]}))
    assert [m.id for m in load(path)] == ["x-y"]  # control


# -- every mutant is a real, acceptable change of the rendered platform ---------------------------

@pytest.mark.parametrize("mutant", MUTANTS, ids=str)
def test_mutant_applies_and_changes_the_rendered_platform(mutant: Mutant, tmp_path: Path) -> None:
    _, changed = prepare(mutant, tmp_path, list(baseline()))
    assert changed


def _made_up(step: Step) -> Mutant:
    return Mutant("made-up", "isolation", "made up", (step,), ("suites/isolation/test_jwt.py",), (Kill("t", "r"),))


NOT_MUTANTS = [
    ("a comment edit (a no-op)", Step("edit", {"file": "mesh/peer-authentication.yaml", "old": "# Mesh-wide",
                                                "new": "# Mesh wide"}), "a no-op"),
    ("a value no schema allows", Step("edit", {"file": "mesh/peer-authentication.yaml", "old": "mode: STRICT",
                                               "new": "mode: LOOSE"}), "the API server (Istio"),
    ("a field the standalone backend does not implement", Step("kustomize_patch", {
        "in": "tenants/tenanta/kustomization.yaml", "target": {"kind": "AuthorizationPolicy", "name": "tenant-isolation"},
        "patch": "- op: add\n  path: /spec/rules/0/from/1/source/ipBlocks\n  value: [10.0.0.0/8]\n"}),
     "the standalone backend refuses it"),
    ("an edit whose text is gone", Step("edit", {"file": "mesh/peer-authentication.yaml", "old": "mode: SOMETIMES",
                                                  "new": "x"}), "exactly once"),
    ("a patch that does not render", Step("kustomize_patch", {
        "in": "tenants/tenanta/kustomization.yaml", "target": {"kind": "AuthorizationPolicy", "name": "tenant-isolation"},
        "patch": "- op: remove\n  path: /spec/rules/7\n"}), "does not render"),
]


@pytest.mark.parametrize("step,names", [(s, n) for _, s, n in NOT_MUTANTS], ids=[w for w, _, _ in NOT_MUTANTS])
def test_prepare_refuses_what_is_not_a_usable_mutant(step: Step, names: str, tmp_path: Path) -> None:
    with pytest.raises(CatalogError) as err:
        prepare(_made_up(step), tmp_path, list(baseline()))
    assert names in str(err.value)


# -- the tests a mutant names exist --------------------------------------------------------------

@functools.cache
def collected(directory: str) -> tuple[tuple[str, ...], str]:
    """Node ids pytest collects from the catalog's files in ``directory``, and its output
    (a directory whose collection fails yields no ids, failing only its own mutants)."""
    files = sorted({r.split("::")[0] for m in MUTANTS for r in m.run if r.startswith(directory + "/")})
    proc = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *files],
                          cwd=REPO, capture_output=True, text=True, timeout=120, check=False)
    ids = tuple(line for line in proc.stdout.splitlines() if "::" in line and not line.startswith(" "))
    return ids, proc.stdout[-3000:] + proc.stderr[-2000:]


@pytest.mark.parametrize("mutant", MUTANTS, ids=str)
def test_mutant_names_tests_that_exist(mutant: Mutant) -> None:
    selected: list[str] = []
    for node in mutant.run:
        ids, output = collected(str(Path(node.split("::")[0]).parent))
        hits = [i for i in ids if i == node or i.startswith(node + "::") or i.startswith(node + "[")
                or (node.endswith(".py") and i.startswith(node + "::"))]
        assert hits, f"{mutant}: {node!r} collects no test:\n{output}"
        selected += hits
    for kill in mutant.kill:
        assert any(re.search(kill.test, i) for i in selected), \
            f"{mutant}: kill test {kill.test!r} matches none of the tests it runs: {selected}"


# -- verdicts --------------------------------------------------------------------------------------

JUNIT = textwrap.dedent("""\
    <?xml version="1.0" encoding="utf-8"?>
    <testsuites><testsuite name="pytest">
      <testcase classname="suites.isolation.test_jwt" name="test_token_at_the_workload[tenanta-no token]">
        <failure message="AssertionError: expected denied: authorization policy (403), got allowed (2xx)">trace</failure>
      </testcase>
      <testcase classname="suites.isolation.test_jwt" name="test_token_at_the_workload[tenantb-no token]"/>
      <testcase classname="suites.isolation.test_drift" name="test_x[tenanta]"><skipped message="why"/></testcase>
      <testcase classname="suites.isolation.test_drift" name="test_y"><error message="failed on setup">boom</error></testcase>
    </testsuite></testsuites>
    """)


def test_parse_junit_gives_node_ids_and_failures(tmp_path: Path) -> None:
    path = tmp_path / "junit.xml"
    path.write_text(JUNIT)
    report = parse_junit(path)
    assert report.passed == ("suites/isolation/test_jwt.py::test_token_at_the_workload[tenantb-no token]",)
    assert report.skipped == ("suites/isolation/test_drift.py::test_x[tenanta]",)
    assert set(report.failed) == {"suites/isolation/test_jwt.py::test_token_at_the_workload[tenanta-no token]",
                                  "suites/isolation/test_drift.py::test_y"}
    assert "got allowed (2xx)" in report.failed["suites/isolation/test_jwt.py::test_token_at_the_workload[tenanta-no token]"]


def _run(failed: dict[str, str] | None = None, passed: tuple[str, ...] = ("p",), returncode: int | None = 1,
         report: bool = True) -> PytestRun:
    return PytestRun(returncode, "output", JunitReport(passed, failed or {}, ()) if report else None, 1.0)


KILL = Mutant("m", "isolation", "made up", (), ("suites/x.py",),
              (Kill(r"no token\]", r"got allowed \(2xx\)"), Kill(r"test_y", "setup")))
FAILURES = {"a::t[no token]": "AssertionError: expected denied: authorization policy (403), got allowed (2xx)",
            "a::test_y": "failed on setup"}

VERDICTS = [
    ("every kill entry matched", _run(FAILURES), Verdict.KILLED),
    ("one kill entry without its reason", _run({**FAILURES, "a::test_y": "failed on teardown"}), Verdict.WRONG_REASON),
    ("other tests failed", _run({"a::other": "got allowed (2xx)"}), Verdict.WRONG_REASON),
    ("everything passed", _run({}), Verdict.SURVIVED),
    ("nothing ran", _run({}, passed=()), Verdict.ERROR),
    ("the run timed out", _run(FAILURES, returncode=None), Verdict.ERROR),
    ("pytest wrote no report", _run(report=False), Verdict.ERROR),
]


@pytest.mark.parametrize("run,verdict", [(r, v) for _, r, v in VERDICTS], ids=[f"{w}: {v}" for w, _, v in VERDICTS])
def test_judge(run: PytestRun, verdict: Verdict) -> None:
    got, killer, detail = judge(KILL, run)
    assert got is verdict, detail
    assert (killer == "a::t[no token]") is (verdict is Verdict.KILLED)


CONTROL_CASES = [
    ("its tests passed", _run({"a::other": "x"}, passed=("suites/x.py::t[1]", "suites/x.py::t[2]")), []),
    ("one of its tests failed", _run({"suites/x.py::t[2]": "boom"}, passed=("suites/x.py::t[1]",)),
     ["suites/x.py::t[2]: boom"]),
    ("none of its tests ran", _run({}, passed=("suites/y.py::t",)), ["none of ['suites/x.py::t'] ran"]),
    ("the control did not finish", _run(returncode=None), ["the control run did not finish"]),
]


@pytest.mark.parametrize("control,problems", [(c, p) for _, c, p in CONTROL_CASES], ids=[w for w, _, _ in CONTROL_CASES])
def test_control_problems(control: PytestRun, problems: list[str]) -> None:
    mutant = Mutant("m", "isolation", "made up", (), ("suites/x.py::t",), (Kill("t", "r"),))
    got = control_problems(mutant, control)
    assert len(got) == len(problems) and all(g.startswith(p) for g, p in zip(got, problems)), got


@pytest.mark.parametrize("args,code,says", [
    (["--list", "--area", "isolation,ingress"], 0, "authz-policy-deleted"),
    (["--list", "--only", "tls-minimum-1-0"], 0, "tls-minimum-1-0"),
    (["--only", "no-such-mutant"], 2, "unknown mutant id(s) or area(s): no-such-mutant"),
    (["--area", "billing"], 2, "unknown mutant id(s) or area(s): billing"),
], ids=["list an area", "list one", "unknown id", "unknown area"])
def test_command_line(args: list[str], code: int, says: str) -> None:
    proc = subprocess.run([sys.executable, "-m", "fixtures.mutants", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=60, check=False)
    assert proc.returncode == code, proc.stdout + proc.stderr
    assert says in proc.stdout + proc.stderr
    if args[:1] == ["--list"] and "--area" in args:
        listed = {line.split()[1] for line in proc.stdout.splitlines()}
        assert listed == {"isolation", "ingress"}, proc.stdout
