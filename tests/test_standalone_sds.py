"""istiod's SDS decision on standalone (fixtures/standalone/sds.py): the gateway receives
its certificate only if its ServiceAccount may list secrets in its namespace."""

from __future__ import annotations

from pathlib import Path

import pytest

from fixtures.manifests import render
from fixtures.standalone import sds
from fixtures.standalone.mesh import load_mesh
from fixtures.standalone.subset import UnsupportedField

PLATFORM = Path(__file__).resolve().parents[1] / "platform"


def role(rules, name="r", ns="istio-system"):
    return sds.read({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
                     "metadata": {"name": name, "namespace": ns}, "rules": rules}, f"Role {ns}/{name}")


def binding(subjects, role_name="r", ns="istio-system", name="b", kind="Role"):
    return sds.read({"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
                     "metadata": {"name": name, "namespace": ns},
                     "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": kind, "name": role_name},
                     "subjects": subjects}, f"RoleBinding {ns}/{name}")


SECRETS = [{"apiGroups": [""], "resources": ["secrets"], "verbs": ["get", "watch", "list"]}]
GATEWAY_SA = {"kind": "ServiceAccount", "name": "istio-ingressgateway", "namespace": "istio-system"}


def test_the_platform_grants_its_gateway_its_secrets():
    model = load_mesh(render(PLATFORM, "standalone"))
    gw = model.gateway_workload
    assert sds.may(model.k8s_rbac, gw.namespace, gw.service_account, "list", "secrets") == \
        ["istio-system/istio-ingressgateway-sds"]


@pytest.mark.parametrize("subject", [
    GATEWAY_SA,
    {"kind": "ServiceAccount", "name": "istio-ingressgateway"},  # the binding's namespace
    {"kind": "User", "name": "system:serviceaccount:istio-system:istio-ingressgateway"},
    {"kind": "Group", "name": "system:serviceaccounts:istio-system"},
    {"kind": "Group", "name": "system:serviceaccounts"},
], ids=lambda s: f"{s['kind']} {s['name']}")
def test_subjects_that_name_the_gateway(subject):
    assert sds.may([role(SECRETS), binding([subject])], "istio-system", "istio-ingressgateway", "list", "secrets")


@pytest.mark.parametrize("objects, why", [
    ([role(SECRETS)], "no binding"),
    ([binding([GATEWAY_SA])], "no role"),
    ([role(SECRETS), binding([{**GATEWAY_SA, "name": "other"}])], "another ServiceAccount"),
    ([role(SECRETS), binding([{**GATEWAY_SA, "namespace": "tenanta"}])], "same name, other namespace"),
    ([role(SECRETS, ns="tenanta"), binding([GATEWAY_SA], ns="tenanta")], "granted in another namespace"),
    ([role([{**SECRETS[0], "verbs": ["get"]}]), binding([GATEWAY_SA])], "get without list"),
    ([role([{**SECRETS[0], "resources": ["configmaps"]}]), binding([GATEWAY_SA])], "another resource"),
    ([role([{**SECRETS[0], "apiGroups": ["apps"]}]), binding([GATEWAY_SA])], "another API group"),
    ([role([{**SECRETS[0], "resourceNames": ["wildcard-example-com"]}]), binding([GATEWAY_SA])],
     "resourceNames never allow list"),
    ([role(SECRETS), binding([{"kind": "Group", "name": "system:serviceaccounts:tenanta"}])], "another group"),
])
def test_what_does_not_grant_it(objects, why):
    assert not sds.may(objects, "istio-system", "istio-ingressgateway", "list", "secrets"), why
    with pytest.raises(sds.SecretsRefused, match="may not list secrets in istio-system"):
        sds.check_gateway(objects, "istio-system", "istio-ingressgateway", "Gateway istio-system/public-gateway",
                          "wildcard-example-com")


def test_wildcards_grant_it():
    star = [{"apiGroups": ["*"], "resources": ["*"], "verbs": ["*"]}]
    assert sds.may([role(star), binding([GATEWAY_SA])], "istio-system", "istio-ingressgateway", "list", "secrets")


@pytest.mark.parametrize("make, field", [
    (lambda: binding([GATEWAY_SA], kind="ClusterRole"), "roleRef.kind"),
    (lambda: role([{**SECRETS[0], "nonResourceURLs": ["/healthz"]}]), "nonResourceURLs"),
    (lambda: binding([{**GATEWAY_SA, "kind": "Robot"}]), "subjects[0].kind"),
])
def test_rbac_outside_the_subset_is_refused_by_field(make, field):
    with pytest.raises(UnsupportedField, match=field.replace("[", r"\[").replace("]", r"\]")):
        make()
