"""The eks backend against fake kubectl: the kube context it pins, what it never does
(create, change or delete the cluster or the platform), the NLB it finds, the run
namespaces it removes (also after failures), faults refused unless --destructive, and
Cognito sign-ins whose passwords never reach a log or an error."""

from __future__ import annotations

import json
import logging
import subprocess
from pathlib import Path

import boto3
import pytest
import yaml
from moto import mock_aws

from fixtures.cluster import versions
from fixtures.cluster.commands import CommandError, Redactor
from fixtures.cluster.fakes import FakeTools, healthy_cluster
from fixtures.cluster.kubectl import RUN_LABEL
from fixtures.cluster.pytest_plugin import destructive_skip_reason
from fixtures.cluster.tools import Tools
from fixtures.eks.backend import EksPlatform
from fixtures.eks.cognito import CognitoIdentityProvider, SignInError, UserRef, load_users, missing_passwords
from fixtures.manifests import kubectl as real_kubectl
from fixtures.manifests import overlay_dir, tenant_folders
from fixtures.platform import MissingCapability, Tenant

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
TENANTS = tenant_folders(PLATFORM)
PASSWORDS = {f"SUITE_{t.upper()}_{who}_PASSWORD": f"Pw-{t}-{who}-7xQ!" for t in TENANTS for who in ("ALICE", "MALLORY")}


def tenant_data(name: str) -> dict[str, str]:
    return yaml.safe_load((PLATFORM / "tenants" / name / "tenant.yaml").read_text())["data"]


@pytest.fixture(scope="module")
def eks_render() -> str:
    return subprocess.run([real_kubectl(), "kustomize", str(overlay_dir(PLATFORM, "eks"))], capture_output=True,
                          text=True, check=True).stdout


@pytest.fixture
def fakes(tmp_path, eks_render):
    f = FakeTools(tmp_path / "fakes")
    f.install("kubectl")
    f.install(f"istioctl-{versions.ISTIO}", versions.istioctl_path(versions.ISTIO))
    f.on("kubectl", "kustomize", stdout=eks_render)
    f.on("kubectl", "get", "namespaces", "platform.example.com/tenant", stdout=json.dumps(
        {"items": [{"metadata": {"name": t}} for t in TENANTS]}))
    for t in TENANTS:
        f.on("kubectl", "get", "configmap", "tenant", t, stdout=json.dumps(
            {"metadata": {"labels": {"platform.example.com/tenant-config": "true"}}, "data": tenant_data(t)}))
    f.sequence("kubectl", "get", "service", "istio-ingressgateway", answers=[
        {"stdout": json.dumps({"metadata": {}, "status": {"loadBalancer": {}}})},
        {"stdout": json.dumps({"metadata": {"annotations": {
            "service.beta.kubernetes.io/aws-load-balancer-proxy-protocol": "*"}},
            "status": {"loadBalancer": {"ingress": [{"hostname": "localhost"}]}}})}])
    f.on("kubectl", "get", "deployment", "app-ui", stdout=json.dumps(
        {"spec": {"template": {"spec": {"containers": [{"image": "registry.example/app-ui:1.4.2"}]}}}}))
    return f


def make(fakes: FakeTools, tmp_path: Path, *, context: str | None = None, destructive: bool = False,
         env: dict[str, str] | None = None) -> EksPlatform:
    healthy_cluster(fakes, real_kubectl(), istio_versions=(versions.ISTIO,), kind_version=versions.KIND)
    tools = Tools(kind="kind-must-not-run", kubectl=str(fakes.root / "bin" / "kubectl"), docker="docker-must-not-run",
                  istioctl={versions.ISTIO: str(fakes.root / versions.istioctl_path(versions.ISTIO))},
                  root=fakes.root)
    plat = EksPlatform(PLATFORM, context=context, destructive=destructive, runner=fakes.runner(tmp_path / "log"),
                       tools=tools, artifacts_dir=tmp_path / "artifacts", run_id="run7",
                       env=PASSWORDS if env is None else env)
    plat.kubectl.poll_interval = 0.01
    return plat


def kubectl_calls(fakes):
    return [a for a in fakes.argvs("kubectl") if a[0] not in ("kustomize", "config")]


def test_current_context_is_used_and_pinned_for_every_call(fakes, tmp_path):
    plat = make(fakes, tmp_path)
    plat.start()
    plat.close()
    assert fakes.argvs("kubectl")[0] == ["config", "current-context"]
    assert all(a[:2] == ["--context", "platform-eks"] for a in kubectl_calls(fakes))


def test_an_explicit_context_wins(fakes, tmp_path):
    plat = make(fakes, tmp_path, context="nightly")
    plat.start()
    plat.close()
    assert ["config", "current-context"] not in fakes.argvs("kubectl")
    assert all(a[:2] == ["--context", "nightly"] for a in kubectl_calls(fakes))


def test_the_cluster_is_never_created_changed_or_destroyed(fakes, tmp_path):
    plat = make(fakes, tmp_path)
    plat.start()
    plat.close()
    assert {c["tool"] for c in fakes.calls()} == {"kubectl"}
    verbs = {a[2] for a in kubectl_calls(fakes)}
    assert verbs <= {"get", "apply", "delete"}, verbs
    for call in fakes.calls("kubectl"):
        a = call["argv"]
        if "apply" in a:  # only the run's own namespace and pod, labelled with the run id
            docs = list(yaml.safe_load_all(call["stdin"]))
            assert {(d["kind"], d["metadata"].get("namespace", d["metadata"]["name"])) for d in docs} == {
                ("Namespace", "suite-run7"), ("Pod", "suite-run7")}
            assert all(d["metadata"]["labels"][RUN_LABEL] == "run7" for d in docs)
        if "delete" in a:
            assert a[2:6] == ["delete", "namespace", "-l", f"{RUN_LABEL}=run7"]


def test_tenants_users_and_gateway_come_from_the_cluster(fakes, tmp_path):
    plat = make(fakes, tmp_path)
    plat.start()
    try:
        assert [t.name for t in plat.tenants] == TENANTS
        gw = plat.gateway()
        assert gw.address == ("localhost", 443)
        assert gw.load_balancer_writes_proxy_header and gw.expects_proxy_protocol
        # the probe pod outside the mesh runs the image the cluster runs, not the repository's tag
        pod_doc = next(d for c in fakes.calls("kubectl") if "apply" in c["argv"]
                       for d in yaml.safe_load_all(c["stdin"]) if d["kind"] == "Pod")
        assert pod_doc["spec"]["containers"][0]["image"] == "registry.example/app-ui:1.4.2"
        with pytest.raises(MissingCapability, match="NLB writes the PROXY header"):
            plat.requires("proxy-protocol")
    finally:
        plat.close()
    # the NLB address was polled until it appeared, then not again
    assert len([a for a in fakes.argvs("kubectl") if "service" in a]) == 2


def test_a_failure_after_the_run_namespace_still_removes_it(fakes, tmp_path):
    fakes.on("kubectl", "get", "secret", stderr="Error from server (Forbidden)\n", exit=1)
    plat = make(fakes, tmp_path)
    with pytest.raises(CommandError, match="Forbidden"):
        plat.start()
    assert fakes.argvs("kubectl")[-1][2:6] == ["delete", "namespace", "-l", f"{RUN_LABEL}=run7"]
    assert (tmp_path / "artifacts" / "setup").is_dir()


def test_missing_passwords_stop_the_start_naming_the_variables(fakes, tmp_path):
    env = dict(PASSWORDS)
    secret = env.pop(f"SUITE_{TENANTS[0].upper()}_ALICE_PASSWORD")
    plat = make(fakes, tmp_path, env=env)
    with pytest.raises(RuntimeError) as err:
        plat.start()
    assert f"SUITE_{TENANTS[0].upper()}_ALICE_PASSWORD" in str(err.value)
    assert not any(p in str(err.value) for p in [secret, *env.values()])


def test_faults_and_destructive_tests_need_asking(fakes, tmp_path):
    plat = make(fakes, tmp_path)
    plat.start()
    try:
        with pytest.raises(MissingCapability, match="--destructive"):
            plat.fault("authz-policy-off")
        plat.destructive = True
        assert plat.fault("authz-policy-off") is not None
    finally:
        plat.close()
    assert destructive_skip_reason("eks", False).startswith("destructive:")
    assert destructive_skip_reason("eks", True) is None
    assert destructive_skip_reason("kind", False) is None


def test_users_are_configuration_templated_per_tenant(tmp_path):
    tenants = [Tenant.from_config(tenant_data(t)) for t in TENANTS]
    users = load_users(tenants)
    t = TENANTS[0]
    assert users[t]["alice"] == UserRef("alice", f"suite-alice@{t}.example.com", f"SUITE_{t.upper()}_ALICE_PASSWORD")
    custom = tmp_path / "users.yaml"
    custom.write_text('users:\n  alice: {username: "a-{tenant}", passwordEnv: "PW_{TENANT}"}\n'
                      f"tenants:\n  {t}:\n    bob: {{username: bob, passwordEnv: BOB_PW}}\n")
    users = load_users(tenants, custom)
    assert set(users[t]) == {"alice", "bob"} and users[t]["alice"].password_env == f"PW_{t.upper()}"
    assert missing_passwords(users, {"BOB_PW": "x"}) == sorted({f"PW_{n.upper()}" for n in TENANTS})


@pytest.fixture
def cognito():
    """A real user pool API (moto, in-process) with one user and a permanent password."""
    with mock_aws():
        client = boto3.client("cognito-idp", region_name="us-east-1")
        pool = client.create_user_pool(PoolName="suite")["UserPool"]["Id"]
        app = client.create_user_pool_client(UserPoolId=pool, ClientName="web",
                                             ExplicitAuthFlows=["ALLOW_ADMIN_USER_PASSWORD_AUTH"])
        client_id = app["UserPoolClient"]["ClientId"]
        client.admin_create_user(UserPoolId=pool, Username="suite-alice", MessageAction="SUPPRESS")
        client.admin_set_user_password(UserPoolId=pool, Username="suite-alice", Password="Correct-Horse-9!",
                                       Permanent=True)
        data = {**tenant_data(TENANTS[0]), "userPoolId": pool, "clientId": client_id}
        yield Tenant.from_config(data), client


def idp(tenant, client, password: str, redact: Redactor) -> CognitoIdentityProvider:
    users = {"alice": UserRef("alice", "suite-alice", "SUITE_TEST_PASSWORD")}
    return CognitoIdentityProvider(tenant, users, client=lambda: client, env={"SUITE_TEST_PASSWORD": password},
                                   redact=redact)


@pytest.fixture
def debug_logs(caplog):
    """botocore at DEBUG (it logs request parameters there); the log record factory restored after."""
    previous = logging.getLogRecordFactory()
    with caplog.at_level(logging.DEBUG):
        yield caplog
    logging.setLogRecordFactory(previous)


def test_a_real_sign_in_returns_an_id_token_and_never_logs_the_password(cognito, debug_logs):
    tenant, client = cognito
    token = idp(tenant, client, "Correct-Horse-9!", Redactor()).token()
    assert token.count(".") == 2
    text = debug_logs.text + "".join(r.getMessage() for r in debug_logs.records)
    assert "AdminInitiateAuth" in text  # botocore did log the request...
    assert "Correct-Horse-9!" not in text  # ...with the password masked
    assert "****" in text


def test_a_failed_sign_in_names_user_and_error_but_not_the_password(cognito, debug_logs):
    tenant, client = cognito
    with pytest.raises(SignInError) as err:
        idp(tenant, client, "Wrong-Horse-1!", Redactor()).token()
    message = str(err.value)
    assert "suite-alice" in message and "NotAuthorizedException" in message
    assert "Wrong-Horse-1!" not in message and "Wrong-Horse-1!" not in repr(err.value)
    assert err.value.__cause__ is None and err.value.__suppress_context__
    assert "Wrong-Horse-1!" not in debug_logs.text


def test_an_unset_password_is_a_missing_capability_naming_the_variable(cognito):
    tenant, client = cognito
    provider = CognitoIdentityProvider(tenant, {"alice": UserRef("alice", "suite-alice", "SUITE_UNSET")},
                                       client=lambda: client, env={"OTHER": "Unrelated-Secret-1"}, redact=Redactor())
    with pytest.raises(MissingCapability, match="SUITE_UNSET"):
        provider.token()
    assert "Unrelated-Secret-1" not in repr(provider)


def test_the_pytest_options_reach_the_backend(tmp_path):
    options = {"--platform-dir": str(PLATFORM), "--keep": False, "--artifacts": str(tmp_path), "--context": "nightly",
               "--destructive": True, "--eks-users": str(tmp_path / "users.yaml")}
    config = type("Config", (), {"getoption": lambda self, name: options[name]})()
    plat = EksPlatform.from_pytest(config)
    try:
        assert (plat.context, plat.destructive, plat.users_file) == ("nightly", True, tmp_path / "users.yaml")
    finally:
        plat.close()


@pytest.mark.parametrize("backend, skipped", [("eks", True), ("kind", True), ("standalone", False)])
def test_a_missing_capability_skips_the_test_on_a_cluster(backend, skipped):
    from fixtures.cluster import pytest_plugin

    item = type("Item", (), {"config": type("Config", (), {"getoption": lambda self, name: backend})()})()
    hook = pytest_plugin.pytest_runtest_call(item)
    next(hook)
    expected = pytest.skip.Exception if skipped else MissingCapability
    with pytest.raises(expected, match="identities: minting"):
        hook.throw(MissingCapability("identities: minting workload certificates needs the mesh CA's key"))
