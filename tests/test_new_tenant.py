"""platform/tools/new_tenant.py: a tenant added by configuration reaches every overlay and
GitOps, renders valid manifests wired to its own host and user pool, gives the suite its
rights in the tenant's namespace and the nightly EKS job its test users' passwords, and a
bad or repeated request, or a file of unexpected shape, is refused without touching the
repository."""

from __future__ import annotations

import json
import re
import shutil
import string
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from fixtures.eks.cognito import load_users
from fixtures.manifests import OVERLAYS, identity, kubectl, load_documents, render, render_flux, tenant_catalog
from fixtures.platform import Tenant
from fixtures.schemas import ISTIO_VERSIONS, assert_valid, validate
from test_workflows import actionlint

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"
#: What new_tenant.py edits outside platform/, relative to the repository.
NIGHTLY = Path(".github") / "workflows" / "nightly-eks.yml"
USERS = Path("fixtures") / "eks" / "users.yaml"
NEW_TENANT = PLATFORM / "tools" / "new_tenant.py"
POOL_ID = re.compile(r"^us-east-1_[0-9A-Za-z]{9}$")
CLIENT_ID = re.compile(r"^[0-9a-z]{26}$")
PLACEHOLDERS = re.compile(r"\bTENANT\b|USER_POOL_ID|CLIENT_ID|\bREGION\b|\$\{")


def copy_platform(dest: Path, *, repo_files: bool = True) -> Path:
    """A copy of platform/ in ``dest`` (with the repository files new_tenant.py also edits,
    unless ``repo_files`` is false); returns the platform folder."""
    platform = dest / "platform"
    shutil.copytree(PLATFORM, platform, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    if repo_files:
        for rel in (NIGHTLY, USERS):
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(REPO / rel, dest / rel)
    return platform


def new_tenant(platform: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(NEW_TENANT), *args, "--platform-dir", str(platform)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def snapshot(platform: Path) -> dict[str, bytes]:
    return {
        p.relative_to(platform).as_posix(): p.read_bytes()
        for p in sorted(platform.rglob("*"))
        if p.is_file() and "__pycache__" not in p.parts
    }


@pytest.fixture(scope="module")
def with_tenantc(tmp_path_factory) -> Path:
    """A copy of platform/ with tenantc added by the generator; removed with pytest's tmp."""
    platform = copy_platform(tmp_path_factory.mktemp("new-tenant"))
    proc = new_tenant(platform, "tenantc")
    assert proc.returncode == 0, f"new_tenant.py tenantc failed:\n{proc.stdout}{proc.stderr}"
    return platform


@pytest.fixture(scope="module")
def renders(with_tenantc) -> dict[str, list[dict[str, Any]]]:
    return {overlay: render(with_tenantc, overlay) for overlay in OVERLAYS + ("gitops",)}


def one(docs, kind: str, namespace: str, name: str) -> dict[str, Any]:
    found = [d for d in docs if identity(d)[1:] == (kind, namespace, name)]
    assert len(found) == 1, f"want one {kind} {namespace}/{name}, found {len(found)}"
    return found[0]


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_overlay_catalogs_the_new_tenant(renders, overlay):
    assert [t["name"] for t in tenant_catalog(renders[overlay])] == ["tenanta", "tenantb", "tenantc"]


@pytest.mark.parametrize("overlay", OVERLAYS + ("gitops",))
def test_manifests_with_the_new_tenant_match_their_schemas(renders, overlay):
    for istio in ISTIO_VERSIONS:
        assert_valid(renders[overlay], overlay=overlay, istio_version=istio)


def test_new_tenant_gets_its_own_unique_cognito_ids(renders):
    catalog = {t["name"]: t for t in tenant_catalog(renders["standalone"])}
    tenantc = catalog["tenantc"]
    assert POOL_ID.match(tenantc["userPoolId"]), tenantc["userPoolId"]
    assert CLIENT_ID.match(tenantc["clientId"]), tenantc["clientId"]
    for other in ("tenanta", "tenantb"):
        assert tenantc["userPoolId"] != catalog[other]["userPoolId"]
        assert tenantc["clientId"] != catalog[other]["clientId"]
    assert tenantc["host"] == "tenantc.example.com"
    assert tenantc["issuer"] == f"https://cognito-idp.us-east-1.amazonaws.com/{tenantc['userPoolId']}"
    assert tenantc["jwksUri"] == tenantc["issuer"] + "/.well-known/jwks.json"


def test_new_tenant_resources_name_the_tenant(renders):
    docs = renders["standalone"]
    tenantc = next(t for t in tenant_catalog(docs) if t["name"] == "tenantc")

    namespace = one(docs, "Namespace", "", "tenantc")
    assert namespace["metadata"]["labels"]["platform.example.com/tenant"] == "tenantc"
    assert namespace["metadata"]["labels"]["istio-injection"] == "enabled"

    host = one(docs, "VirtualService", "tenantc", "tenant-host")
    assert host["spec"]["hosts"] == ["tenantc.example.com"]
    assert host["spec"]["http"][0]["delegate"] == {"name": "rag-api", "namespace": "tenantc"}

    isolation = one(docs, "AuthorizationPolicy", "tenantc", "tenant-isolation")["spec"]["rules"][0]
    assert isolation["from"][1]["source"]["namespaces"] == ["tenantc"]
    when = {w["key"]: w["values"] for w in isolation["when"]}
    assert when == {
        "request.auth.claims[iss]": [tenantc["issuer"]],
        "request.auth.claims[custom:tenantid]": ["tenantc"],
        "request.auth.claims[token_use]": ["id"],
        "request.headers[x-auth-request-tenantid]": ["tenantc"],
    }

    edge = one(docs, "AuthorizationPolicy", "istio-system", "tenantc-edge")["spec"]["rules"][0]
    assert edge["to"][0]["operation"]["hosts"] == ["tenantc.example.com"]
    assert {w["key"]: w["values"] for w in edge["when"]}["request.auth.claims[custom:tenantid]"] == ["tenantc"]

    for namespace_, name in (("tenantc", "tenant-jwt"), ("istio-system", "tenantc-edge")):
        (rule,) = one(docs, "RequestAuthentication", namespace_, name)["spec"]["jwtRules"]
        assert (rule["issuer"], rule["jwksUri"], rule["audiences"]) == (
            tenantc["issuer"],
            tenantc["jwksUri"],
            [tenantc["clientId"]],
        )

    leftovers = [
        f"{d['kind']} {d['metadata'].get('namespace')}/{d['metadata']['name']}"
        for d in docs
        if "tenantc" in json.dumps(d) and PLACEHOLDERS.search(json.dumps(d))
    ]
    assert not leftovers, f"placeholders left in {leftovers}"


def test_gitops_applies_the_new_tenant_like_the_eks_overlay(with_tenantc, renders):
    (flux,) = [
        d
        for d in renders["gitops"]
        if d["kind"] == "Kustomization" and d["spec"].get("path") == "./platform/tenants/tenantc"
    ]
    eks = {identity(d): d for d in renders["eks"]}
    applied = render_flux(with_tenantc, flux)
    assert {identity(d) for d in applied} == {k for k in eks if k[2] == "tenantc" or k[3] == "tenantc"} | {
        k for k in eks if k[2] == "istio-system" and k[3].startswith("tenantc-")
    }
    for doc in applied:
        assert doc == eks[identity(doc)]


def test_generated_oauth2_proxy_values_point_at_the_tenant(with_tenantc, renders):
    tenantc = next(t for t in tenant_catalog(renders["standalone"]) if t["name"] == "tenantc")
    text = (with_tenantc / "tenants" / "tenantc" / "oauth2-proxy-values.yaml").read_text()
    assert f'oidc_issuer_url = "{tenantc["issuer"]}"' in text
    assert f'client_id = "{tenantc["clientId"]}"' in text
    assert 'redirect_url = "https://tenantc.example.com/oauth2/callback"' in text
    assert "${" not in text


def test_catalog_is_complete_after_adding(with_tenantc):
    proc = subprocess.run(
        [sys.executable, str(PLATFORM / "tools" / "check_catalog.py"), "--platform-dir", str(with_tenantc)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr


def test_adding_an_existing_tenant_is_refused_and_changes_nothing(with_tenantc):
    before = snapshot(with_tenantc.parent)
    proc = new_tenant(with_tenantc, "tenantc")
    assert proc.returncode == 1
    assert "tenant 'tenantc' already exists" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(with_tenantc.parent) == before


@dataclass(frozen=True)
class BadName:
    name: str
    reason: str

    def __str__(self) -> str:
        return f"{self.name!r} is refused ({self.reason})"


BAD_NAMES = [
    BadName("TenantC", "not a valid tenant name: it must be a DNS label"),
    BadName("tenant_c", "not a valid tenant name: it must be a DNS label"),
    BadName("tenantc-", "not a valid tenant name: it must be a DNS label"),
    BadName("t" * 59, "not a valid tenant name: it must be a DNS label of at most 58 characters"),
    BadName("_template", "not a valid tenant name: it must be a DNS label"),
    BadName("istio-system", "namespace istio-system belongs to the platform"),
    BadName("kube-tenant", "namespace kube-tenant belongs to the platform"),
    BadName("myawsco", "Cognito refuses the domain prefix myawsco-auth"),
]


@pytest.mark.parametrize("bad", BAD_NAMES, ids=str)
def test_bad_name_is_refused_and_changes_nothing(with_tenantc, bad):
    before = snapshot(with_tenantc.parent)
    proc = new_tenant(with_tenantc, bad.name)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert bad.reason in proc.stderr
    assert "Traceback" not in proc.stderr
    assert snapshot(with_tenantc.parent) == before


def test_given_cognito_ids_are_used_verbatim(tmp_path):
    platform = copy_platform(tmp_path)
    proc = new_tenant(platform, "tenantd", "--user-pool-id", "eu-west-1_AbCdEfGhI", "--client-id", "0123456789abcdefghijklmnop")
    assert proc.returncode == 0, proc.stderr
    (tenantd,) = [t for t in tenant_catalog(render(platform, "standalone")) if t["name"] == "tenantd"]
    assert (tenantd["region"], tenantd["userPoolId"], tenantd["clientId"]) == (
        "eu-west-1",
        "eu-west-1_AbCdEfGhI",
        "0123456789abcdefghijklmnop",
    )
    assert tenantd["issuer"] == "https://cognito-idp.eu-west-1.amazonaws.com/eu-west-1_AbCdEfGhI"


@pytest.mark.parametrize(
    "args, reason",
    [
        (("--user-pool-id", "not-a-pool"), "is not a Cognito user pool id"),
        (("--client-id", "has spaces in it"), "is not a Cognito app client id"),
        (("--user-pool-id", "us-east-1_Tn7A2xQ9p"), "is already tenant tenanta's"),
    ],
    ids=["malformed pool id", "malformed client id", "another tenant's pool"],
)
def test_bad_cognito_ids_are_refused(tmp_path, args, reason):
    platform = copy_platform(tmp_path)
    before = snapshot(platform.parent)
    proc = new_tenant(platform, "tenantd", *args)
    assert proc.returncode == 2 and reason in proc.stderr, proc.stderr
    assert snapshot(platform.parent) == before


def test_an_entry_already_listed_is_kept_once_and_comments_survive(tmp_path):
    platform = copy_platform(tmp_path)
    kind = platform / "overlays" / "kind" / "kustomization.yaml"
    kind.write_text(kind.read_text().replace("  - ../../tenants/tenantb\n", "  - ../../tenants/tenantb\n  - ../../tenants/tenantd\n"))
    comments = {p: [l for l in p.read_text().splitlines() if l.lstrip().startswith("#")] for p in platform.glob("overlays/*/kustomization.yaml")}
    proc = new_tenant(platform, "tenantd")
    assert proc.returncode == 0, proc.stderr
    for path, lines in comments.items():
        text = path.read_text()
        assert text.count("../../tenants/tenantd") == 1, f"{path.parent.name}:\n{text}"
        assert [l for l in text.splitlines() if l.lstrip().startswith("#")] == lines


@pytest.mark.parametrize("existing", ["tenanta", "tenantb"])
def test_template_reproduces_the_existing_tenant(existing):
    """Generated tenants look like hand-made ones: the template filled with a tenant's
    own values gives that tenant's files. A change to one must go into the other."""
    folder = PLATFORM / "tenants" / existing
    (data,) = [d["data"] for d in load_documents((folder / "tenant.yaml").read_text()) if d["kind"] == "ConfigMap"]
    values = {
        "name": data["name"],
        "host": data["host"],
        "region": data["region"],
        "user_pool_id": data["userPoolId"],
        "client_id": data["clientId"],
    }
    template = PLATFORM / "tenants" / "_template"
    # corpus/ is each tenant's own content; tests/test_corpus.py checks the template's rendering.
    for path in sorted(p for p in template.rglob("*") if p.is_file() and "corpus" not in p.relative_to(template).parts):
        rel = path.relative_to(template)
        expected = string.Template(path.read_text()).substitute(values)
        assert (folder / rel).read_text() == expected, f"tenants/{existing}/{rel} differs from tenants/_template/{rel}"


# --- what the suite needs of the new tenant: RBAC on a shared cluster, nightly passwords ---


def kustomized(directory: Path) -> list[dict[str, Any]]:
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, check=True,
                         timeout=60).stdout
    return load_documents(out, source=str(directory))


@pytest.mark.parametrize("folder, role", [("suite-rbac", "platform-suite-namespace"),
                                          ("suite-rbac/destructive", "platform-suite-destructive")],
                         ids=["base", "destructive"])
def test_the_suite_is_bound_in_the_new_tenants_namespace(with_tenantc, folder, role):
    docs = kustomized(with_tenantc / folder)
    bindings = [d for d in docs if d["kind"] == "RoleBinding" and d["roleRef"]["name"] == role]
    (new,) = [b for b in bindings if b["metadata"]["namespace"] == "tenantc"]
    (old,) = [b for b in bindings if b["metadata"]["namespace"] == "tenanta"]
    assert {**new, "metadata": {}} == {**old, "metadata": {}}, "tenantc's RoleBinding differs from tenanta's"
    assert new["metadata"]["name"] == old["metadata"]["name"]
    assert not validate(docs, overlay=folder, istio_version=ISTIO_VERSIONS[0])


def workflow_env(repo: Path) -> dict[str, str]:
    doc = yaml.safe_load((repo / NIGHTLY).read_text())
    return {k: v for job in doc["jobs"].values() for s in job["steps"] for k, v in (s.get("env") or {}).items()}


def test_the_nightly_job_gets_the_new_tenants_passwords(with_tenantc):
    repo = with_tenantc.parent
    tenants = [Tenant.from_config(d) for d in tenant_catalog(render(with_tenantc, "standalone"))]
    wanted = sorted(u.password_env for per in load_users(tenants, repo / USERS).values() for u in per.values())
    assert any("TENANTC" in w for w in wanted)
    env = workflow_env(repo)
    assert not [w for w in wanted if env.get(w) != f"${{{{ secrets.{w} }}}}"], env
    original = (REPO / NIGHTLY).read_text().splitlines()
    edited = (repo / NIGHTLY).read_text().splitlines()
    assert [line for line in edited if "TENANTC" not in line] == original, "only lines were added"
    proc = subprocess.run([actionlint(), "-no-color", str(repo / NIGHTLY)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr




def test_entries_made_by_hand_before_are_kept_once(tmp_path):
    platform = copy_platform(tmp_path)
    bindings = platform / "suite-rbac" / "tenant-bindings.yaml"
    bindings.write_text(bindings.read_text() + "---\n" + bindings.read_text().split("---\n")[0].replace(
        "namespace: tenanta", "namespace: tenantd"))
    workflow = tmp_path / NIGHTLY
    line = "          SUITE_TENANTB_MALLORY_PASSWORD: ${{ secrets.SUITE_TENANTB_MALLORY_PASSWORD }}\n"
    workflow.write_text(workflow.read_text().replace(
        line, line + line.replace("TENANTB_MALLORY", "TENANTD_ALICE")))
    proc = new_tenant(platform, "tenantd")
    assert proc.returncode == 0, proc.stderr
    assert bindings.read_text().count("namespace: tenantd") == 1
    text = workflow.read_text()
    assert text.count("SUITE_TENANTD_ALICE_PASSWORD:") == 1 and text.count("SUITE_TENANTD_MALLORY_PASSWORD:") == 1


def test_without_the_nightly_workflow_beside_it_the_tenant_is_added_with_a_note(tmp_path):
    platform = copy_platform(tmp_path, repo_files=False)
    proc = new_tenant(platform, "tenantd")
    assert proc.returncode == 0, proc.stderr
    assert "to do: no .github/workflows/nightly-eks.yml beside this platform folder" in proc.stdout
    assert "namespace: tenantd" in (platform / "suite-rbac" / "tenant-bindings.yaml").read_text()


@dataclass(frozen=True)
class Shape:
    """A file new_tenant.py edits, changed into a shape it must refuse."""

    what: str
    file: str  # relative to the repository copy
    old: str
    new: str
    reason: str
    everywhere: bool = False  # replace every occurrence of `old`, not the first

    def __str__(self) -> str:
        return f"{self.what} is refused"


STEP = "      - name: make test-eks\n        run: make test-eks CONTEXT=platform-eks\n"
SHAPES = [
    Shape("RoleBindings that disagree on their role", "platform/suite-rbac/tenant-bindings.yaml",
          "  name: platform-suite-namespace\n", "  name: platform-suite-other\n",
          "its RoleBindings differ in name, roleRef or subjects"),
    Shape("a bindings file without a RoleBinding", "platform/suite-rbac/destructive/roles.yaml",
          "kind: RoleBinding\n", "kind: ClusterRoleBinding\n", "no RoleBinding to copy for namespace tenantd",
          everywhere=True),
    Shape("a suite step without env", str(NIGHTLY), "        env:\n          CI: \"true\"\n",
          "        with:\n          CI: \"true\"\n", "has no block `env:` mapping"),
    Shape("two suite steps", str(NIGHTLY), STEP, STEP + "        env: {}\n" + STEP,
          "expected one step running `make test-eks` (not its dry run), found 2"),
    Shape("a users file whose user has no passwordEnv", str(USERS), "    passwordEnv: SUITE_{TENANT}_ALICE_PASSWORD\n",
          "", "user 'alice' has no passwordEnv"),
]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_files_of_unexpected_shape_are_refused_and_nothing_is_written(tmp_path, shape):
    platform = copy_platform(tmp_path)
    path = tmp_path / shape.file
    text = path.read_text()
    assert shape.old in text, f"{shape.file} no longer has {shape.old!r}; update this row"
    path.write_text(text.replace(shape.old, shape.new, -1 if shape.everywhere else 1))
    before = snapshot(tmp_path)
    proc = new_tenant(platform, "tenantd")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert shape.reason in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert snapshot(tmp_path) == before


def test_a_missing_users_file_is_refused_when_the_workflow_is_there(tmp_path):
    platform = copy_platform(tmp_path)
    (tmp_path / USERS).unlink()
    before = snapshot(tmp_path)
    proc = new_tenant(platform, "tenantd")
    assert proc.returncode == 1 and "cannot name the password variables" in proc.stderr, proc.stderr
    assert snapshot(tmp_path) == before
