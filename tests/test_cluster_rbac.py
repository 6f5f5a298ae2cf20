"""The suite's RBAC for a shared cluster (platform/suite-rbac): valid against the
Kubernetes schemas, least privilege by construction, covering every tenant, and enough
for every command the eks backend issues (checked by evaluating the rules against the
eks plan, and destructive/ against the plan of a --destructive run: Flux suspended and
resumed, a fault, and the rollout of every Canary), but no more than the plans need in
the places it matters. Its admission policies are evaluated in test_admission_policies.py."""

from __future__ import annotations

import copy
import functools
import json
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from fixtures.cluster.commands import Background, Command, Poll, Recorder
from fixtures.cluster.plan import FIXED_RUN_ID, eks_plan
from fixtures.cluster.tools import resolve
from fixtures.eks.backend import EksPlatform
from fixtures.eks.flux import API_GROUP, RESOURCE, delivered_by
from fixtures.manifests import kubectl, load_documents, render, tenant_folders
from fixtures.schemas import ISTIO_VERSIONS, validate

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
RBAC = PLATFORM / "suite-rbac"
SUITE_SA = ("ServiceAccount", "platform-suite", "platform-suite")
SUITE_GROUP = ("Group", "platform-suite", "")
WRITE_VERBS = {"create", "update", "patch", "delete", "deletecollection", "escalate", "bind", "impersonate"}


@functools.cache
def rendered(directory: Path) -> tuple[dict, ...]:
    out = subprocess.run([kubectl(), "kustomize", str(directory)], capture_output=True, text=True, check=True).stdout
    return tuple(load_documents(out, source=str(directory)))


def of_kind(docs, kind):
    return [d for d in docs if d["kind"] == kind]


@pytest.mark.parametrize("directory", [RBAC, RBAC / "destructive"], ids=["base", "destructive"])
def test_rbac_is_valid_kubernetes(directory):
    errors = validate(rendered(directory), overlay=f"suite-rbac/{directory.name}", istio_version=ISTIO_VERSIONS[0])
    assert not errors, "\n".join(map(str, errors))


def all_rules(docs):
    for d in docs:
        for rule in d.get("rules", []):
            yield d, rule


@pytest.mark.parametrize("directory", [RBAC, RBAC / "destructive"], ids=["base", "destructive"])
def test_no_wildcards_and_secrets_only_by_name(directory):
    for doc, rule in all_rules(rendered(directory)):
        for key in ("verbs", "resources", "apiGroups"):
            assert "*" not in rule.get(key, []), f"{doc['metadata']['name']}: wildcard in {key}"
        if "secrets" in rule.get("resources", []):
            assert rule.get("resourceNames") and set(rule["verbs"]) == {"get"}, doc["metadata"]["name"]
        assert not {"escalate", "bind", "impersonate"} & set(rule["verbs"])
        assert not {"roles", "rolebindings", "clusterroles", "clusterrolebindings"} & set(rule.get("resources", []))


def test_cluster_wide_writes_are_confined_by_the_admission_policy():
    docs = rendered(RBAC)
    roles = {d["metadata"]["name"]: d for d in of_kind(docs, "ClusterRole")}
    bound_cluster_wide = {b["roleRef"]["name"] for b in of_kind(docs, "ClusterRoleBinding")}
    policy = of_kind(docs, "ValidatingAdmissionPolicy")[0]
    guarded = {r for rule in policy["spec"]["matchConstraints"]["resourceRules"] for r in rule["resources"]}
    for name in bound_cluster_wide:
        for rule in roles[name]["rules"]:
            if WRITE_VERBS & set(rule["verbs"]):
                assert set(rule["resources"]) <= guarded, (name, rule)
    binding = of_kind(docs, "ValidatingAdmissionPolicyBinding")[0]
    assert binding["spec"] == {"policyName": policy["metadata"]["name"], "validationActions": ["Deny"]}
    condition = policy["spec"]["matchConditions"][0]["expression"]
    assert "system:serviceaccount:platform-suite:platform-suite" in condition and "'platform-suite'" in condition
    assert policy["spec"]["failurePolicy"] == "Fail"


def test_every_binding_names_only_the_suite():
    for b in of_kind(rendered(RBAC), "ClusterRoleBinding") + of_kind(rendered(RBAC), "RoleBinding"):
        subjects = {(s["kind"], s["name"], s.get("namespace", "")) for s in b["subjects"]}
        assert subjects == {SUITE_SA, SUITE_GROUP}, b["metadata"]
    for b in of_kind(rendered(RBAC / "destructive"), "RoleBinding"):
        assert [(s["kind"], s["name"]) for s in b["subjects"]] == [("Group", "platform-suite-destructive")]


@pytest.mark.parametrize("tenant_name", tenant_folders(PLATFORM))
def test_every_tenant_namespace_is_bound(tenant_name):
    bound = {b["metadata"]["namespace"] for b in of_kind(rendered(RBAC), "RoleBinding")
             if b["roleRef"]["name"] == "platform-suite-namespace"}
    assert tenant_name in bound, (f"platform/suite-rbac/tenant-bindings.yaml has no RoleBinding for {tenant_name}: "
                             "the suite could not call from its pods on a shared cluster")
    assert "istio-system" in bound
    destructive = {b["metadata"]["namespace"] for b in of_kind(rendered(RBAC / "destructive"), "RoleBinding")
                   if b["roleRef"]["name"] == "platform-suite-destructive"}
    assert tenant_name in destructive, (f"platform/suite-rbac/destructive/roles.yaml has no RoleBinding for "
                                        f"{tenant_name}: a destructive run could not fault its policies or pods")


# --- an RBAC evaluator, to check the eks plan against the rules ------------------------


@dataclass(frozen=True)
class Request:
    verb: str
    resource: str
    group: str = ""
    namespace: str = ""  # "" = cluster-scoped or all namespaces
    name: str = ""
    subresource: str = ""

    def __str__(self) -> str:
        r = self.resource + (f"/{self.subresource}" if self.subresource else "")
        return f"{self.verb} {self.group or 'core'}/{r} {self.namespace}/{self.name}"


def allowed(docs, req: Request) -> bool:
    roles = {(d["kind"], d["metadata"].get("namespace", ""), d["metadata"]["name"]): d
             for d in docs if d["kind"] in ("Role", "ClusterRole")}
    grants = []  # (namespace or None for everywhere, role)
    for b in of_kind(docs, "ClusterRoleBinding"):
        grants.append((None, roles.get(("ClusterRole", "", b["roleRef"]["name"]))))
    for b in of_kind(docs, "RoleBinding"):
        ns = b["metadata"]["namespace"]
        kind = b["roleRef"]["kind"]
        grants.append((ns, roles.get((kind, ns if kind == "Role" else "", b["roleRef"]["name"]))))
    resource = req.resource + (f"/{req.subresource}" if req.subresource else "")
    for ns, role in grants:
        if role is None or (ns is not None and ns != req.namespace):
            continue
        for rule in role["rules"]:
            if (req.group in rule.get("apiGroups", []) and resource in rule.get("resources", [])
                    and req.verb in rule["verbs"]
                    and (not rule.get("resourceNames") or req.name in rule["resourceNames"])):
                return True
    return False


KINDS = {"namespace": ("", "namespaces"), "namespaces": ("", "namespaces"), "configmap": ("", "configmaps"),
         "service": ("", "services"), "secret": ("", "secrets"), "pods": ("", "pods"), "pod": ("", "pods"),
         "deployment": ("apps", "deployments"), "deployments": ("apps", "deployments"), "events": ("", "events"),
         "authorizationpolicy": ("security.istio.io", "authorizationpolicies"), "canary": ("flagger.app", "canaries"),
         RESOURCE: (API_GROUP, "kustomizations")}
#: kubectl flags followed by a value (the value is not a positional argument)
VALUED_FLAGS = {"-n", "-l", "-o", "-p", "-c", "-f", "--type"}


def positionals(args: list[str]) -> list[str]:
    out, skip = [], False
    for a in args:
        if skip:
            skip = False
        elif a in VALUED_FLAGS:
            skip = True
        elif not a.startswith("-"):
            out.append(a)
    return out


def requests_of(cmd: Command) -> list[Request]:
    """What a kubectl or istioctl command asks the API server for."""
    a = list(cmd.argv)
    if cmd.tool == "istioctl":  # proxy-config all <pod>.<ns>: read the pod, forward to its admin port
        pod, ns = a[a.index("all") + 1].rsplit(".", 1)
        return [Request("get", "pods", namespace=ns, name=pod),
                Request("create", "pods", namespace=ns, name=pod, subresource="portforward")]
    a = a[3:] if a[1] == "--context" else a[1:]
    ns = a[a.index("-n") + 1] if "-n" in a else ""
    verb = a[0]
    if verb in ("kustomize", "config"):
        return []  # local
    if verb == "get":
        group, resource = KINDS[a[1]]
        name = a[2] if len(a) > 2 and not a[2].startswith("-") else ""
        return [Request("get" if name else "list", resource, group, ns, name)]
    if verb == "apply":
        out = []
        for d in load_documents(cmd.stdin):
            group, resource = KINDS[d["kind"].lower()]
            dns = d["metadata"].get("namespace", "")
            out += [Request(v, resource, group, dns, d["metadata"]["name"]) for v in ("patch", "create")]
        return out
    if verb == "delete" and "-f" in a:  # the objects on stdin, each deleted then awaited by name
        out = []
        for d in load_documents(cmd.stdin):
            group, resource = KINDS[d["kind"].lower()]
            dns, name = d["metadata"].get("namespace", ""), d["metadata"]["name"]
            out += [Request("delete", resource, group, dns, name), Request("get", resource, group, dns, name)]
        return out
    if verb == "patch":
        kind, name = positionals(a[1:])
        group, resource = KINDS[kind]
        return [Request("patch", resource, group, ns, name)]
    if verb == "delete":
        group, resource = KINDS[a[1]]
        return [Request("list", resource, group, ns), Request("delete", resource, group, ns)]
    if verb == "exec":
        pod = a[a.index(ns) + 1]
        return [Request("get", "pods", namespace=ns, name=pod),
                Request("create", "pods", namespace=ns, name=pod, subresource="exec")]
    if verb == "logs":
        return [Request("get", "pods", namespace=ns, name=a[3], subresource="log")]
    if verb == "port-forward":
        return [Request("get", "services", namespace=ns, name=a[3].split("/", 1)[1]),
                Request("list", "pods", namespace=ns),
                Request("create", "pods", namespace=ns, subresource="portforward")]
    raise AssertionError(f"unmapped command {cmd.argv}")


def plan_commands(*, destructive: bool) -> list[Command]:
    steps = eks_plan(PLATFORM, context="shared", destructive=destructive)
    cmds = [s.command if isinstance(s, (Poll, Background)) else s for s in steps]
    cmds = [c for c in cmds if c.argv[0] != "#"]
    # the real run also reads the image the cluster runs (the dry run uses the repository's)
    cmds.append(Command(("kubectl", "--context", "shared", "get", "deployment", "app-ui", "-n", "tenanta", "-o",
                         "json"), "image"))
    return cmds


@pytest.fixture(scope="module")
def eks_commands() -> list[Command]:
    return plan_commands(destructive=False)


@pytest.fixture(scope="module")
def destructive_commands() -> list[Command]:
    return plan_commands(destructive=True)


def test_the_rbac_allows_every_command_of_an_eks_run(eks_commands):
    docs = rendered(RBAC)
    needed = [r for c in eks_commands for r in requests_of(c)]
    assert len(needed) > 20
    denied = [f"{r}  <- {' '.join(c.argv[1:6])}" for c in eks_commands for r in requests_of(c) if not allowed(docs, r)]
    assert not denied, "\n".join(denied)


def test_the_rbac_refuses_what_a_run_does_not_need():
    docs = rendered(RBAC)
    for req in [Request("get", "secrets", namespace="istio-system", name="istiod-ca"),
                Request("list", "secrets", namespace="tenanta"),
                Request("patch", "deployments", "apps", "istio-system", "istio-ingressgateway"),
                Request("delete", "authorizationpolicies", "security.istio.io", "tenanta", "tenant-isolation"),
                Request("create", "deployments", "apps", "tenanta"),
                Request("get", "configmaps", namespace="kube-system", name="aws-auth")]:
        assert not allowed(docs, req), str(req)
    # the destructive identity gets exactly what the cluster faults change
    destructive = rendered(RBAC / "destructive")
    assert allowed(destructive, Request("patch", "deployments", "apps", "istio-system", "istio-ingressgateway"))
    assert allowed(destructive, Request("delete", "authorizationpolicies", "security.istio.io", "tenanta"))
    assert not allowed(destructive, Request("delete", "deployments", "apps", "tenanta"))


# --- a destructive run: the separate identity has base/ and destructive/ ---------------


def flux_requests(cmds: list[Command]) -> list[Request]:
    return [r for c in cmds for r in requests_of(c) if r.group == API_GROUP]


def test_the_destructive_rbac_allows_every_command_of_a_destructive_eks_run(destructive_commands):
    docs = rendered(RBAC) + rendered(RBAC / "destructive")
    flux = flux_requests(destructive_commands)
    kustomizations = delivered_by(render(PLATFORM, "gitops"))
    # each Kustomization of platform/gitops read, suspended and resumed
    assert sorted(flux, key=str) == sorted([Request(v, "kustomizations", API_GROUP, k.namespace, k.name)
                                           for k in kustomizations for v in ("get", "patch", "patch")], key=str)
    assert any(r.resource == "authorizationpolicies" and r.verb == "delete"
               for c in destructive_commands for r in requests_of(c)), "the plan shows no fault"
    denied = [f"{r}  <- {' '.join(c.argv[1:7])}" for c in destructive_commands for r in requests_of(c)
              if not allowed(docs, r)]
    assert not denied, "\n".join(denied)


def test_only_the_destructive_identity_touches_flux(eks_commands):
    assert not flux_requests(eks_commands), "a run without --destructive must not touch Flux"
    base = rendered(RBAC)
    for k in delivered_by(render(PLATFORM, "gitops")):
        for verb in ("get", "patch"):
            assert not allowed(base, Request(verb, "kustomizations", API_GROUP, k.namespace, k.name)), (verb, k)


def test_the_flux_rights_are_get_and_patch_of_kustomizations_in_the_flux_namespace_only():
    destructive = rendered(RBAC / "destructive")
    namespaces = {k.namespace for k in delivered_by(render(PLATFORM, "gitops"))}
    granted = {b["metadata"]["namespace"] for d, rule in all_rules(destructive) if API_GROUP in rule["apiGroups"]
               for b in of_kind(destructive, "RoleBinding") if b["roleRef"]["name"] == d["metadata"]["name"]}
    assert granted == namespaces == {"flux-system"}
    for req in [Request("patch", "kustomizations", API_GROUP, "tenanta", "mesh"),
                Request("list", "kustomizations", API_GROUP, "flux-system"),
                Request("delete", "kustomizations", API_GROUP, "flux-system", "mesh"),
                Request("update", "kustomizations", API_GROUP, "flux-system", "mesh"),
                Request("patch", "gitrepositories", "source.toolkit.fluxcd.io", "flux-system", "platform"),
                Request("patch", "imageupdateautomations", "image.toolkit.fluxcd.io", "flux-system", "platform"),
                Request("patch", "deployments", "apps", "flux-system", "kustomize-controller"),
                Request("delete", "pods", "", "flux-system")]:
        assert not allowed(destructive, req), str(req)
    assert allowed(destructive, Request("patch", "kustomizations", API_GROUP, "flux-system", "mesh"))
    policy_rules = [r for p in of_kind(destructive, "ValidatingAdmissionPolicy")
                    for r in p["spec"]["matchConstraints"]["resourceRules"]]
    assert any(API_GROUP in r["apiGroups"] and "kustomizations" in r["resources"] and "UPDATE" in r["operations"]
               for r in policy_rules), "the patch right on Kustomizations must be confined by an admission policy"


# --- a destructive run's rollouts (fixtures/cluster/rollout.py) ---------------------------


def _rollout_answers(app: str, argv) -> str | None:
    """What the cluster answers a rollout's reads with: the target or primary Deployment with
    the app's container, a settled Canary."""
    if "deployment" in argv:
        name = argv[argv.index("deployment") + 1]
        return json.dumps({"metadata": {"name": name}, "spec": {"template": {"spec": {"containers": [
            {"name": app, "image": f"{app}:1.0.0", "env": [{"name": "APP_VERSION", "value": "1.0.0"}]}]}}}})
    if "canary" in argv:
        return json.dumps({"spec": {}, "status": {"phase": "Succeeded"}})
    return None


@pytest.fixture(scope="module")
def rollouts() -> tuple[list[tuple[str, str]], list[Command]]:
    """(namespace, target) of every Canary of the eks overlay, and the commands of a rollout
    of each (triggered, awaited, reverted) as a --destructive eks run issues them: the
    backend's own code driven by a Recorder (which runs no poll's check)."""
    runner = Recorder()
    platform = EksPlatform(PLATFORM, context="shared", runner=runner, tools=resolve(dry_run=True),
                           run_id=FIXED_RUN_ID, destructive=True)
    platform.start()
    try:
        canaries = [(d["metadata"]["namespace"], d["spec"]["targetRef"]["name"]) for d in platform.manifests()
                    if d["kind"] == "Canary"]
        start = len(runner.history)
        for ns, app in canaries:
            runner.responses = functools.partial(_rollout_answers, app)
            with platform.rollout(ns, app, "9.9.9") as rollout:
                rollout.run()
        runner.responses = None
        steps = runner.history[start:]
    finally:
        platform.close()
    return canaries, [s.command if isinstance(s, (Poll, Background)) else s for s in steps]


def test_the_destructive_rbac_allows_a_rollout_of_every_canary_and_needs_its_canary_rule(rollouts):
    canaries, cmds = rollouts
    assert {ns for ns, _ in canaries} == set(tenant_folders(PLATFORM))
    needed = [r for c in cmds for r in requests_of(c)]
    patched = [r for r in needed if r.resource == "canaries" and r.verb == "patch"]
    # skipAnalysis set for the revert, then restored, on each Canary
    assert sorted(patched, key=str) == sorted([Request("patch", "canaries", "flagger.app", ns, app)
                                               for ns, app in canaries for _ in (1, 2)], key=str)
    docs = rendered(RBAC) + rendered(RBAC / "destructive")
    denied = [f"{r}  <- {' '.join(c.argv[3:8])}" for c in cmds for r in requests_of(c) if not allowed(docs, r)]
    assert not denied, "\n".join(denied)
    # needed: without that rule exactly the Canary patches are refused; the base never has them
    without = copy.deepcopy(docs)
    for d in without:
        if d["kind"] == "ClusterRole" and d["metadata"]["name"] == "platform-suite-destructive":
            d["rules"] = [r for r in d["rules"] if "flagger.app" not in r["apiGroups"]]
    assert [r for r in needed if not allowed(without, r)] == patched
    assert not any(allowed(rendered(RBAC), r) for r in patched)
    assert not allowed(docs, Request("delete", "canaries", "flagger.app", canaries[0][0], canaries[0][1]))
