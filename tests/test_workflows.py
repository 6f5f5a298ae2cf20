"""The GitHub workflows: actionlint finds nothing, and each does what it promises (PR:
standalone and kind with artifacts on failure; nightly EKS with OIDC role assumption and
no stored keys; a manual Istio gate taking the target version)."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from fixtures.eks.cognito import load_users
from fixtures.manifests import tenant_folders
from fixtures.platform import Tenant

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = REPO / ".github" / "workflows"
FILES = sorted(WORKFLOWS.glob("*.yml"))


def actionlint() -> str:
    """ACTIONLINT, else the one installed in this virtualenv (requirements), else PATH."""
    beside = Path(sys.executable).parent / "actionlint"
    found = os.environ.get("ACTIONLINT") or (str(beside) if beside.is_file() else shutil.which("actionlint"))
    if not found:
        pytest.fail("actionlint not found: it is pinned in requirements.lock (`make setup`), or set ACTIONLINT")
    return found


def test_actionlint_finds_nothing():
    assert FILES, "no workflows"
    proc = subprocess.run([actionlint(), "-no-color", *map(str, FILES)], capture_output=True, text=True,
                          cwd=REPO, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def load(name: str) -> dict:
    doc = yaml.safe_load((WORKFLOWS / name).read_text())
    doc["on"] = doc.pop(True, doc.get("on"))  # YAML 1.1 reads the key `on` as True
    return doc


def steps(doc: dict) -> list[dict]:
    return [s for job in doc["jobs"].values() for s in job["steps"]]


def runs(doc: dict) -> str:
    return "\n".join(s.get("run", "") for s in steps(doc))


def uploads_on_failure(job: dict) -> bool:
    return any(s.get("uses", "").startswith("actions/upload-artifact@") and s.get("if") == "failure()"
               and "artifacts/" in s["with"]["path"] for s in job["steps"])


def test_pull_requests_run_standalone_and_kind_with_artifacts_on_failure():
    pr = load("pr.yml")
    assert "pull_request" in pr["on"]
    jobs = {name: "\n".join(s.get("run", "") for s in job["steps"]) for name, job in pr["jobs"].items()}
    assert any("make test\n" in r + "\n" for r in jobs.values())
    kind = next(name for name, r in jobs.items() if "make test-local" in r)
    assert "make cluster-tools" in jobs[kind] and "make test-local DRY_RUN=1" in jobs[kind]
    assert all(uploads_on_failure(job) for job in pr["jobs"].values())


def test_nightly_eks_assumes_a_role_through_oidc_and_holds_no_keys():
    nightly = load("nightly-eks.yml")
    assert "schedule" in nightly["on"]
    assert nightly["permissions"]["id-token"] == "write"
    creds = [s for s in steps(nightly) if s.get("uses", "").startswith("aws-actions/configure-aws-credentials@")]
    assert len(creds) == 1 and creds[0]["with"]["role-to-assume"].startswith("${{ vars.")
    assert "make test-eks" in runs(nightly)
    assert all(uploads_on_failure(job) for job in nightly["jobs"].values())


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_no_long_lived_keys_and_actions_pinned_to_a_release(path):
    text = path.read_text()
    for forbidden in ("aws-access-key-id", "aws-secret-access-key", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        assert forbidden not in text, f"{path.name}: {forbidden}"
    for s in steps(load(path.name)):
        if "uses" in s:
            ref = s["uses"].rpartition("@")[2]
            assert ref and ref not in ("main", "master", "latest"), s["uses"]


def test_every_test_users_password_reaches_the_nightly_job():
    tenants = [Tenant.from_config(yaml.safe_load((REPO / "platform" / "tenants" / t / "tenant.yaml").read_text())["data"])
               for t in tenant_folders(REPO / "platform")]
    wanted = {u.password_env for per in load_users(tenants).values() for u in per.values()}
    env = {k: v for s in steps(load("nightly-eks.yml")) for k, v in (s.get("env") or {}).items()}
    missing = sorted(w for w in wanted if env.get(w) != f"${{{{ secrets.{w} }}}}")
    assert not missing, f"nightly-eks.yml does not pass these passwords from secrets: {missing}"


def test_the_gate_is_manual_and_takes_the_target_version():
    gate = load("istio-gate.yml")
    inputs = gate["on"]["workflow_dispatch"]["inputs"]
    assert inputs["istio_version"]["required"] is True
    text = runs(gate)
    assert "make istio-gate BACKEND=kind" in text and "${{" not in text  # the input reaches run via env only
    assert all(uploads_on_failure(job) for job in gate["jobs"].values())


def make_prerequisites() -> dict[str, set[str]]:
    """Makefile target -> the targets it depends on, transitively (variables like
    $(STAMP) are not targets and are left out)."""
    direct: dict[str, list[str]] = {}
    for line in (REPO / "Makefile").read_text().splitlines():
        m = re.match(r"^([a-zA-Z][\w-]*):(?!=)\s*([^#]*)", line)
        if m:
            direct[m.group(1)] = [d for d in m.group(2).split() if not d.startswith("$")]

    def closure(target: str, seen: set[str]) -> set[str]:
        for dep in direct.get(target, []):
            if dep not in seen:
                seen.add(dep)
                closure(dep, seen)
        return seen

    return {target: closure(target, set()) for target in direct}


@pytest.mark.parametrize("path", FILES, ids=lambda p: p.name)
def test_make_targets_that_need_system_packages_get_them_first(path):
    """`make system-deps` installs Debian packages and needs root: a target that depends on
    it fails on a runner unless an earlier step ran `sudo make system-deps`."""
    needs = {t for t, deps in make_prerequisites().items() if "system-deps" in deps}
    assert {"test", "istio-gate"} <= needs  # the rule below is about something real
    for name, job in load(path.name)["jobs"].items():
        installed = False
        for step in job["steps"]:
            run = step.get("run", "")
            if re.search(r"^sudo make system-deps\b", run, re.M):
                installed = True
            for target in re.findall(r"^make ([a-z][\w-]*)", run, re.M):
                assert target not in needs or installed, (
                    f"{path.name} job {name}: `make {target}` needs the system packages (make system-deps, as "
                    "root) and no earlier step runs `sudo make system-deps`")

