"""The suite's ValidatingAdmissionPolicies (platform/suite-rbac and its destructive/),
evaluated with celpy as the API server would admit real requests (fixtures/admission.py):
the run-scope policy confines the suite's identities to their run namespaces, and a
destructive run may change nothing of a Flux Kustomization but its suspension. Every
expression must compile under celpy, name only what admission declares, and evaluate
without error in every case."""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from fixtures.admission import Policy, PolicyError, Request, admit, compile_expression, policies
from fixtures.cluster.backend import ClusterPlatform
from fixtures.cluster.kubectl import FIELD_MANAGER, RUN_LABEL
from fixtures.eks.flux import API_GROUP, resume_patch, suspend_patch
from fixtures.manifests import load_documents, render

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
RBAC_DIRS = ("suite-rbac", "suite-rbac/destructive")
FLUX_CRD = PLATFORM / "schemas" / "crds" / "flux" / f"{API_GROUP}_kustomizations.yaml"
RUN_SCOPE, FLUX = "platform-suite-run-scope", "platform-suite-destructive-flux"
RUN_ID = "20260301020304-a1b2c3"
ADMITTED, DENIED, NOT_APPLIED = "admitted", "denied", "not applied"

@dataclass(frozen=True)
class Identity:
    """Who a request comes from, as the API server authenticates it (EKS access entries
    map IAM roles to Kubernetes groups)."""

    label: str
    username: str
    groups: tuple[str, ...]


SUITE_SA = Identity("the suite's ServiceAccount", "system:serviceaccount:platform-suite:platform-suite",
                    ("system:serviceaccounts", "system:serviceaccounts:platform-suite", "system:authenticated"))
NIGHTLY = Identity("the nightly job", "arn:aws:sts::111122223333:assumed-role/platform-suite-nightly/1767225600",
                   ("platform-suite", "system:authenticated"))
DESTRUCTIVE = Identity("a destructive run", "arn:aws:sts::111122223333:assumed-role/platform-suite-destructive/alice",
                       ("platform-suite", "platform-suite-destructive", "system:authenticated"))
NAMESPACE_CONTROLLER = Identity("the namespace controller", "system:serviceaccount:kube-system:namespace-controller",
                                ("system:serviceaccounts", "system:serviceaccounts:kube-system",
                                 "system:authenticated"))
TENANT_ADMIN = Identity("a tenant's admin", "arn:aws:sts::111122223333:assumed-role/tenanta-admin/bob",
                        ("tenanta-admins", "system:authenticated"))
KUSTOMIZE_CONTROLLER = Identity("kustomize-controller", "system:serviceaccount:flux-system:kustomize-controller",
                                ("system:serviceaccounts", "system:serviceaccounts:flux-system",
                                 "system:authenticated"))

@functools.cache
def bound() -> tuple[Policy, ...]:
    """Every policy of base and destructive/ as `kubectl kustomize` renders them, bound."""
    return tuple(policies([d for directory in RBAC_DIRS for d in render(PLATFORM, directory)]))


@functools.cache
def eks_docs() -> tuple[dict, ...]:
    return tuple(render(PLATFORM, "eks"))


def stored(doc: dict[str, Any]) -> dict[str, Any]:
    """``doc`` as the API server keeps it: with a uid, a resourceVersion and, on a
    Namespace, the label the server adds to every one."""
    doc = copy.deepcopy(doc)
    meta = doc.setdefault("metadata", {})
    meta.setdefault("uid", f"uid-{meta['name']}")
    meta.setdefault("resourceVersion", "4242")
    if doc.get("kind") == "Namespace":
        meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
    return doc


def namespace(name: str) -> dict[str, Any]:
    """A Namespace of the platform as rendered (tenants, istio-system), the run's, or one the
    cluster brings (kube-system, flux-system)."""
    if name == run_namespace()["metadata"]["name"]:
        return run_namespace()
    for d in eks_docs():
        if d["kind"] == "Namespace" and d["metadata"]["name"] == name:
            return stored(d)
    assert name in ("kube-system", "flux-system"), f"no Namespace {name} in platform/overlays/eks"
    return stored({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})


def run_docs() -> list[dict[str, Any]]:
    """The Namespace and Pod a run creates (ClusterPlatform.run_namespace_docs) for RUN_ID."""
    plat = ClusterPlatform.__new__(ClusterPlatform)  # its manifests, without a cluster
    plat.run_id, plat.docs = RUN_ID, list(eks_docs())
    return plat.run_namespace_docs()


def run_namespace() -> dict[str, Any]:
    return stored(run_docs()[0])


#: a pod of each namespace the cases reach (the run's is the suite's own)
PODS = {"istio-system": "prometheus-7f9c6d5b8-q4w2z", "kube-system": "coredns-5d78c9869d-8xk2p"}


def pod(ns: str) -> dict[str, Any]:
    if ns == run_namespace()["metadata"]["name"]:
        return stored(run_docs()[1])
    name = PODS.get(ns, "rag-api-primary-5d8f9c7b6-x2x7q")  # a tenant's app
    return stored({"apiVersion": "v1", "kind": "Pod", "metadata": {"name": name, "namespace": ns},
                   "spec": {"containers": [{"name": name.split("-")[0], "image": f"{name.split('-')[0]}:1"}]}})


# --- the run-scope policy: base identities, run namespaces, pods ----------------------------


@dataclass(frozen=True)
class Case:
    what: str
    request: Request
    expect: str
    policy: str
    because: str = ""  # a part of the denial's message

    def __str__(self) -> str:
        return f"{self.what} is {self.expect}"


def ns_request(who: Identity, operation: str, before: dict | None, after: dict | None) -> Request:
    name = (after or before or {})["metadata"]["name"]
    return Request(operation, "namespaces", who.username, who.groups, name=name, object=after, old_object=before,
                   namespace="" if operation == "CREATE" else name,
                   namespace_object=None if operation == "CREATE" else before)


def pod_request(who: Identity, operation: str, ns: str, *, subresource: str = "") -> Request:
    p = pod(ns)
    name = p["metadata"]["name"]
    if operation == "CONNECT":  # the object of a CONNECT is its options
        options = {"apiVersion": "v1", "kind": "PodExecOptions", "stdout": True, "stderr": True,
                   "container": p["spec"]["containers"][0]["name"], "command": ["python", "-c", "print(1)"]} \
            if subresource == "exec" else {"apiVersion": "v1", "kind": "PodPortForwardOptions", "ports": [9090]}
        return Request("CONNECT", "pods", who.username, who.groups, subresource=subresource, name=name, namespace=ns,
                       object=options, namespace_object=namespace(ns))
    return Request(operation, "pods", who.username, who.groups, name=name, namespace=ns, namespace_object=namespace(ns),
                   object=None if operation == "DELETE" else p, old_object=p if operation != "CREATE" else None)


NS_ONLY = "only namespaces labelled platform.example.com/suite-run"
PODS_ONLY = "make or remove pods only in its run namespaces"


def run_scope_cases() -> list:
    run_ns = run_namespace()["metadata"]["name"]
    unlabelled = {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "scratch"}}
    tenant = namespace("tenanta")
    relabelled = copy.deepcopy(tenant)
    relabelled["metadata"]["labels"][RUN_LABEL] = RUN_ID
    rows = [
        Case("the suite's ServiceAccount creating its run namespace", ns_request(SUITE_SA, "CREATE", None,
             run_namespace()), ADMITTED, RUN_SCOPE),
        Case("the nightly job deleting its run namespace", ns_request(NIGHTLY, "DELETE", run_namespace(), None),
             ADMITTED, RUN_SCOPE),
        Case("the suite creating an unlabelled namespace", ns_request(SUITE_SA, "CREATE", None, unlabelled),
             DENIED, RUN_SCOPE, NS_ONLY),
        Case("the suite deleting a tenant's namespace", ns_request(NIGHTLY, "DELETE", tenant, None),
             DENIED, RUN_SCOPE, NS_ONLY),
        Case("the suite creating its pod in its run namespace", pod_request(SUITE_SA, "CREATE", run_ns),
             ADMITTED, RUN_SCOPE),
        Case("the suite deleting a pod of its run namespace", pod_request(NIGHTLY, "DELETE", run_ns),
             ADMITTED, RUN_SCOPE),
        Case("the suite creating a pod in a tenant's namespace", pod_request(NIGHTLY, "CREATE", "tenanta"),
             DENIED, RUN_SCOPE, PODS_ONLY),
        Case("the suite exec'ing into a tenant's app", pod_request(NIGHTLY, "CONNECT", "tenanta", subresource="exec"),
             ADMITTED, RUN_SCOPE),
        Case("the suite forwarding a port in istio-system",
             pod_request(SUITE_SA, "CONNECT", "istio-system", subresource="portforward"), ADMITTED, RUN_SCOPE),
        Case("the suite exec'ing into a pod of kube-system",
             pod_request(NIGHTLY, "CONNECT", "kube-system", subresource="exec"), DENIED, RUN_SCOPE, PODS_ONLY),
        Case("a destructive run deleting a tenant's app pod", pod_request(DESTRUCTIVE, "DELETE", "tenanta"),
             ADMITTED, RUN_SCOPE),
        Case("the nightly job deleting a tenant's app pod", pod_request(NIGHTLY, "DELETE", "tenanta"),
             DENIED, RUN_SCOPE, PODS_ONLY),
        Case("a destructive run deleting a pod of kube-system", pod_request(DESTRUCTIVE, "DELETE", "kube-system"),
             DENIED, RUN_SCOPE, PODS_ONLY),
        Case("the namespace controller deleting a tenant's namespace",
             ns_request(NAMESPACE_CONTROLLER, "DELETE", tenant, None), NOT_APPLIED, RUN_SCOPE),
        Case("a tenant's admin creating a pod in the tenant's namespace",
             pod_request(TENANT_ADMIN, "CREATE", "tenanta"), NOT_APPLIED, RUN_SCOPE),
    ]
    gap = Case("the suite labelling a tenant's namespace as a run's", ns_request(NIGHTLY, "UPDATE", tenant, relabelled),
               DENIED, RUN_SCOPE, NS_ONLY)
    return rows + [gap]


def check(case: Case) -> None:
    __tracebackhide__ = True
    result = admit(bound(), case.request)
    assert not result.errors, f"{result}\nexpressions that did not evaluate: {result.errors}"
    if case.expect == NOT_APPLIED:
        assert case.policy not in result.applied and result.allowed, str(result)
        return
    assert case.policy in result.applied, f"{case.policy} should decide: {result}"
    if case.expect == ADMITTED:
        assert result.allowed, str(result)
    else:
        assert not result.allowed and any(case.because in m for m in result.denials), \
            f"expected a denial saying {case.because!r}: {result}"


@pytest.mark.parametrize("case", run_scope_cases(), ids=str)
def test_the_run_scope_policy(case):
    check(case)


# --- the Flux policy: a destructive run may only suspend and resume -----------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (what `kubectl patch --type=merge` asks the server for)."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def kustomization(name: str) -> dict[str, Any]:
    """A Kustomization of platform/gitops as kustomize-controller keeps it on the cluster."""
    (doc,) = [d for d in render(PLATFORM, "gitops") if d["kind"] == "Kustomization" and d["metadata"]["name"] == name]
    doc = stored(doc)
    doc["metadata"].update({
        "generation": 7, "finalizers": ["finalizers.fluxcd.io"],
        "labels": {"kustomize.toolkit.fluxcd.io/name": "flux-system", "kustomize.toolkit.fluxcd.io/namespace":
                   "flux-system"},
        "annotations": {"reconcile.fluxcd.io/requestedAt": "2026-03-01T00:00:00Z"},
        "managedFields": [{"manager": "kustomize-controller", "operation": "Apply", "apiVersion": doc["apiVersion"],
                           "time": "2026-03-01T00:00:00Z"}]})
    doc["status"] = {"observedGeneration": 7, "lastAppliedRevision": "main@sha1:0123abcd"}
    return doc


def updated(before: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """The object an UPDATE carries to admission after ``patch``: merged, with what the API
    server adds before admission (its field manager's entry; generation + 1 on a spec change)."""
    after = merge_patch(before, patch)
    after["status"] = copy.deepcopy(before.get("status"))  # status is a subresource: unchanged here
    meta = after["metadata"]
    meta["managedFields"] = [*before["metadata"]["managedFields"], {
        "manager": FIELD_MANAGER, "operation": "Update", "apiVersion": before["apiVersion"],
        "time": "2026-03-01T02:03:04Z"}]
    if after.get("spec") != before.get("spec"):
        meta["generation"] = before["metadata"]["generation"] + 1
    return after


def flux_request(who: Identity, before: dict[str, Any], patch: dict[str, Any]) -> Request:
    return Request("UPDATE", "kustomizations", who.username, who.groups, group=API_GROUP, version="v1",
                   name=before["metadata"]["name"], namespace="flux-system", object=updated(before, patch),
                   old_object=before, namespace_object=namespace("flux-system"))


SPEC_ONLY = "may change only spec.suspend"
ANNOTATION_ONLY = "may change only the annotation platform.example.com/suspended-by-run"
NO_METADATA = "may change no metadata"


def flux_cases() -> list[Case]:
    mesh, tenant = kustomization("mesh"), kustomization("tenant-tenanta")
    suspend, resume = json.loads(suspend_patch(RUN_ID)), json.loads(resume_patch())
    suspended = updated(mesh, suspend)
    # (who, does what to a Kustomization, before, merge patch, expected, part of the denial)
    rows = [
        ("suspending (spec.suspend true, annotated with the run)", DESTRUCTIVE, mesh, suspend, ADMITTED, ""),
        ("resuming (spec.suspend false, the annotation removed)", DESTRUCTIVE, suspended, resume, ADMITTED, ""),
        ("changing spec.path", DESTRUCTIVE, mesh, {"spec": {"path": "./platform/elsewhere"}}, DENIED, SPEC_ONLY),
        ("suspending and changing spec.path at once", DESTRUCTIVE, mesh,
         merge_patch(suspend, {"spec": {"path": "./platform/elsewhere"}}), DENIED, SPEC_ONLY),
        ("changing spec.sourceRef", DESTRUCTIVE, mesh,
         {"spec": {"sourceRef": {"kind": "GitRepository", "name": "elsewhere"}}}, DENIED, SPEC_ONLY),
        ("flipping spec.prune", DESTRUCTIVE, mesh, {"spec": {"prune": False}}, DENIED, SPEC_ONLY),
        ("adding spec.postBuild", DESTRUCTIVE, mesh, {"spec": {"postBuild": {"substitute": {"x": "y"}}}}, DENIED,
         SPEC_ONLY),
        ("removing spec.dependsOn", DESTRUCTIVE, tenant, {"spec": {"dependsOn": None}}, DENIED, SPEC_ONLY),
        ("adding a label", DESTRUCTIVE, mesh, {"metadata": {"labels": {"team": "x"}}}, DENIED, NO_METADATA),
        ("adding an owner reference", DESTRUCTIVE, mesh, {"metadata": {"ownerReferences": [
            {"apiVersion": "v1", "kind": "ConfigMap", "name": "gone", "uid": "0000"}]}}, DENIED, NO_METADATA),
        ("removing the finalizer", DESTRUCTIVE, mesh, {"metadata": {"finalizers": None}}, DENIED, NO_METADATA),
        ("changing another annotation", DESTRUCTIVE, mesh,
         {"metadata": {"annotations": {"reconcile.fluxcd.io/requestedAt": "now"}}}, DENIED, ANNOTATION_ONLY),
        ("adding another annotation", DESTRUCTIVE, mesh,
         {"metadata": {"annotations": {"kustomize.toolkit.fluxcd.io/reconcile": "disabled"}}}, DENIED,
         ANNOTATION_ONLY),
        ("removing another annotation", DESTRUCTIVE, suspended,
         {"metadata": {"annotations": {"reconcile.fluxcd.io/requestedAt": None}}}, DENIED, ANNOTATION_ONLY),
        ("changing spec.path", KUSTOMIZE_CONTROLLER, mesh, {"spec": {"path": "./platform/mesh2"}}, NOT_APPLIED, ""),
        ("changing spec.path (not in the destructive group)", NIGHTLY, mesh,
         {"spec": {"path": "./platform/elsewhere"}}, NOT_APPLIED, ""),
    ]
    return [Case(f"{who.label} updating a Kustomization, {what},", flux_request(who, before, patch), expect, FLUX,
                 because)
            for what, who, before, patch, expect, because in rows]


@pytest.mark.parametrize("case", flux_cases(), ids=str)
def test_the_flux_policy(case):
    check(case)


def test_the_flux_policy_covers_every_served_version_and_only_updates():
    flux = next(p for p in bound() if p.name == FLUX)
    (crd,) = load_documents(FLUX_CRD.read_text(), source=str(FLUX_CRD))
    served = [v["name"] for v in crd["spec"]["versions"] if v.get("served")]
    before = kustomization("mesh")
    assert served
    for version in served:
        assert flux.matches(dataclasses.replace(flux_request(DESTRUCTIVE, before, {}), version=version)), version
    for operation in ("CREATE", "DELETE"):
        req = Request(operation, "kustomizations", DESTRUCTIVE.username, DESTRUCTIVE.groups, group=API_GROUP,
                      name="mesh", namespace="flux-system",
                      object=before if operation == "CREATE" else None,
                      old_object=before if operation == "DELETE" else None,
                      namespace_object=namespace("flux-system"))
        assert not flux.matches(req), operation  # RBAC grants neither


# --- every policy: compiles, is bound, fails closed -----------------------------------------


def expressions() -> list:
    out = []
    for directory in RBAC_DIRS:
        for doc in render(PLATFORM, directory):
            if doc["kind"] != "ValidatingAdmissionPolicy":
                continue
            spec, name = doc["spec"], doc["metadata"]["name"]
            declared = [v["name"] for v in spec.get("variables", [])]
            for key in ("variables", "matchConditions", "validations"):
                for i, entry in enumerate(spec.get(key, [])):
                    where = f"{name} spec.{key}[{i}].expression"
                    out.append(pytest.param(where, entry["expression"], declared, id=where))
    return out


@pytest.mark.parametrize("where, text, declared", expressions())
def test_every_expression_compiles_under_celpy(where, text, declared):
    compile_expression(where, text, variables=declared)


def test_every_policy_is_bound_to_deny_and_fails_closed():
    assert sorted(p.name for p in bound()) == sorted([RUN_SCOPE, FLUX])
    for p in bound():
        assert (p.actions, p.failure_policy) == (("Deny",), "Fail"), p.name


@pytest.mark.parametrize("mutation, error", [
    (lambda s: s["validations"][0].update(expression=s["validations"][0]["expression"] + " &&"), "CEL syntax error"),
    (lambda s: s["validations"][0].update(expression="variables.specs.all(k, true)"), "names variables.specs"),
    (lambda s: s["matchConditions"][0].update(expression="request.userInfo.username.lowerAscii() == 'x'"),
     "calls lowerAscii, which celpy lacks"),
    (lambda s: s.update(paramKind={"apiVersion": "v1", "kind": "ConfigMap"}), "paramKind not emulated"),
], ids=["syntax error", "undeclared variable", "Kubernetes library function", "params"])
def test_a_broken_policy_is_refused_naming_where(mutation, error):
    (doc,) = [d for d in render(PLATFORM, "suite-rbac/destructive") if d["kind"] == "ValidatingAdmissionPolicy"]
    doc = copy.deepcopy(doc)
    mutation(doc["spec"])
    with pytest.raises(PolicyError, match=error) as err:
        policies([doc])
    assert FLUX in str(err.value)


# --- the emulator's own semantics, where the cases above do not reach -----------------------


def synthetic(*, condition: str = "true", validation: str = "true", failure: str = "Fail",
              resources: tuple[str, ...] = ("pods",), scope: str = "*", variables: dict[str, str] | None = None
              ) -> Policy:
    (p,) = policies([
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicy",
         "metadata": {"name": "p"}, "spec": {
             "failurePolicy": failure, "matchConditions": [{"name": "c", "expression": condition}],
             "variables": [{"name": k, "expression": v} for k, v in (variables or {}).items()],
             "matchConstraints": {"resourceRules": [{"apiGroups": [""], "apiVersions": ["v1"], "operations": ["*"],
                                                     "resources": list(resources), "scope": scope}]},
             "validations": [{"expression": validation, "message": "no"}]}},
        {"apiVersion": "admissionregistration.k8s.io/v1", "kind": "ValidatingAdmissionPolicyBinding",
         "metadata": {"name": "p"}, "spec": {"policyName": "p", "validationActions": ["Deny"]}}])
    return p


def test_errors_follow_the_failure_policy_and_a_false_condition_wins():
    req = pod_request(NIGHTLY, "DELETE", "tenanta")
    missing = "object.metadata.name == 'x'"  # object is null on DELETE: an error
    assert not synthetic(validation=missing).review(req).allowed
    assert synthetic(validation=missing, failure="Ignore").review(req).allowed
    assert not synthetic(condition=missing).review(req).allowed
    assert not synthetic(condition=f"false && {missing}").review(req).applies
    assert not synthetic(validation="false").review(req).allowed
    assert synthetic(validation="has(request.userInfo.groups)").review(
        Request("DELETE", "pods", "anonymous", (), name="p", namespace="tenanta", old_object=pod("tenanta"),
                namespace_object=namespace("tenanta"))).denials == ("no",)
    # a variable is evaluated when used: one that fails fails only what uses it
    broken = {"name": missing, "groups": "request.userInfo.groups"}
    assert synthetic(variables=broken, validation="'platform-suite' in variables.groups").review(req).allowed
    assert not synthetic(variables=broken, validation="variables.name").review(req).allowed


RULES = [  # (resources of the rule, scope, subresource of a CONNECT to a pod in tenanta, matched)
    (("pods",), "*", "", True),
    (("pods",), "*", "exec", False),
    (("pods/exec",), "*", "exec", True),
    (("*",), "*", "exec", False),
    (("pods/*",), "*", "", True),
    (("*/*",), "*", "log", True),
    (("pods",), "Cluster", "", False),
    (("pods",), "Namespaced", "", True),
]


@pytest.mark.parametrize("resources, scope, subresource, matched", [
    pytest.param(*row, id=f"{','.join(row[0])} scope {row[1]} {'matches' if row[3] else 'misses'} "
                          f"pods{'/' + row[2] if row[2] else ''}") for row in RULES])
def test_resource_rules_match_as_the_api_server_does(resources, scope, subresource, matched):
    req = Request("CONNECT", "pods", NIGHTLY.username, NIGHTLY.groups, subresource=subresource, name="p",
                  namespace="tenanta", namespace_object=namespace("tenanta"))
    assert synthetic(resources=resources, scope=scope).matches(req) is matched


@pytest.mark.parametrize("kwargs, error", [
    ({"operation": "DELETE", "object": {"kind": "Pod"}}, "DELETE carries object=False"),
    ({"operation": "UPDATE", "old_object": None}, "UPDATE carries object=True, oldObject=True"),
    ({"namespace_object": None}, "a namespaceObject goes with a namespace"),
    ({"namespace_object": {"metadata": {"name": "tenantb"}}}, "and is that namespace"),
    ({"resource": "pods/exec"}, "resource is the lower-case plural alone"),
])
def test_a_request_of_a_shape_the_api_server_never_sends_is_refused(kwargs, error):
    good = dict(operation="UPDATE", resource="pods", username="u", name="p", namespace="tenanta",
                object=pod("tenanta"), old_object=pod("tenanta"), namespace_object=namespace("tenanta"))
    with pytest.raises(ValueError, match=error):
        Request(**{**good, **kwargs})
