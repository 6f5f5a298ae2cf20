"""Per-tenant IAM for rag-api on EKS, as far as it can be proven offline: the template
(platform/aws/tenant-iam.yaml) passes cfn-lint; its renderer (platform/tools/tenant_iam.py)
turns every tenant of the catalog into parameters and a deploy command, and refuses bad
input; the policy those parameters produce grants each tenant exactly what rag-api calls on
its own resources and nothing of another tenant's; its trust policy admits only the
tenant's rag-api pods; the stack deploys in moto, whose S3 enforces the role's policy; and
fixtures/eks/iam.py, the nightly check against real IAM, builds its requests and reads
IAM's answers right (a unit test with botocore's Stubber: no AWS is called)."""

from __future__ import annotations

import ast
import json
import re
import shlex
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable
from urllib.parse import quote

import boto3
import botocore.session
import pytest
import yaml
from botocore.exceptions import ClientError
from botocore.stub import Stubber

from fixtures.eks import iam
from fixtures.platform import Tenant

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"
TEMPLATE = PLATFORM / "aws" / "tenant-iam.yaml"
APPS_DIR = PLATFORM / "apps"
CFN_LINT = Path(sys.executable).with_name("cfn-lint")
sys.path.insert(0, str(PLATFORM / "tools"))
import check_catalog  # noqa: E402
import tenant_iam  # noqa: E402

if str(APPS_DIR) not in sys.path:
    sys.path.insert(0, str(APPS_DIR))

#: The account of the catalog's provisioned-model ARNs, used as the stacks' account offline.
ACCOUNT = "111122223333"
CLUSTER = "platform-prod"


def catalog() -> list[Tenant]:
    """Every tenant folder of the repository (nothing hard-coded: a new tenant grows every table)."""
    return [Tenant.from_config(tenant_iam.load_config(PLATFORM / "tenants" / n / "tenant.yaml", n))
            for n in check_catalog.tenant_folders(PLATFORM)]


TENANTS = catalog()
NAMES = [t.name for t in TENANTS]


def stack(t: Tenant, **kw: Any) -> tenant_iam.Stack:
    return tenant_iam.render(dict(t.data), cluster=CLUSTER, others={o.name: dict(o.data) for o in TENANTS}, **kw)


def permissions(t: Tenant, account: str = ACCOUNT) -> dict[str, Any]:
    return tenant_iam.policies(stack(t), account=account)


# --- cfn-lint: AWS's resource specifications --------------------------------------------------


def cfn_lint(path: Path) -> list[dict[str, Any]]:
    regions = sorted({t.region for t in TENANTS})
    proc = subprocess.run([str(CFN_LINT), "--format", "json", "--include-checks", "I", "--regions", *regions,
                           "--", str(path)], capture_output=True, text=True, timeout=120, check=False)
    assert proc.stdout.strip().startswith("["), f"cfn-lint did not run:\n{proc.stdout}{proc.stderr}"
    return json.loads(proc.stdout)


def test_template_passes_cfn_lint_with_informational_checks():
    found = cfn_lint(TEMPLATE)
    assert found == [], "\n".join(f"{m['Rule']['Id']} {m['Message']} (line {m['Location']['Start']['LineNumber']})"
                                  for m in found)


@pytest.mark.parametrize("broken, rule", [
    (("Action: s3:GetObject\n", "Action: s3:GetObjekt\n"), "W3037"),  # no such action
    (("      Namespace:\n", "      Namespce:\n"), "E3002"),  # no such property
], ids=["a misspelled action is reported", "a misspelled property is reported"])
def test_cfn_lint_reports_a_broken_copy(tmp_path, broken, rule):
    text = TEMPLATE.read_text()
    assert broken[0] in text
    (tmp_path / "t.yaml").write_text(text.replace(broken[0], broken[1], 1))
    assert rule in {m["Rule"]["Id"] for m in cfn_lint(tmp_path / "t.yaml")}


# --- the renderer ---------------------------------------------------------------------------


def test_catalog_has_tenants_to_isolate():
    assert len(TENANTS) >= 2, f"isolation needs two tenants; the catalog has {NAMES}"


@pytest.mark.parametrize("name", NAMES)
def test_every_tenant_renders_every_template_parameter(name):
    t = TENANTS[NAMES.index(name)]
    s = stack(t)
    template = tenant_iam.load_template(TEMPLATE)
    assert set(s.parameters) == set(template["Parameters"])
    for key, spec in template["Parameters"].items():
        values = tenant_iam.listed(s.parameters[key]) if spec["Type"] == "CommaDelimitedList" else [s.parameters[key]]
        for value in values:  # CloudFormation applies the pattern to each item of a list
            assert re.fullmatch(spec["AllowedPattern"], value), f"{key}={value!r} fails its AllowedPattern"
            for wild in ("*", "?", "$"):
                widened = value[:-1] + wild + value[-1]
                assert not re.fullmatch(spec["AllowedPattern"], widened), f"{key} admits {widened!r}"
    argv = s.argv()
    assert argv[:3] == ["aws", "cloudformation", "deploy"]
    assert argv[argv.index("--stack-name") + 1] == f"{name}-rag-api-iam"
    assert argv[argv.index("--capabilities") + 1] == "CAPABILITY_NAMED_IAM"
    assert argv[argv.index("--parameter-overrides") + 1:] == [f"{k}={v}" for k, v in s.parameters.items()]


def run_tool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, str(PLATFORM / "tools" / "tenant_iam.py"), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=60, check=False)


def test_cli_prints_the_deploy_command_and_json():
    t = TENANTS[0]
    text = run_tool(t.name, "--cluster", CLUSTER)
    assert text.returncode == 0, text.stderr
    expected = stack(t).argv(REPO)
    assert expected[4] == "platform/aws/tenant-iam.yaml"
    assert shlex.split(text.stdout.strip().splitlines()[-1]) == expected
    out = json.loads(run_tool(t.name, "--cluster", CLUSTER, "--json").stdout)
    assert out["argv"] == expected and out["parameters"] == stack(t).parameters


def test_cli_reads_the_configmap_as_the_cluster_has_it(tmp_path):
    t = TENANTS[0]
    cm = {"apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "tenant", "namespace": t.name},
          "data": dict(t.data)}
    (tmp_path / "cm.yaml").write_text(yaml.safe_dump(cm))
    out = json.loads(run_tool(t.name, "--cluster", CLUSTER, "--json", "--config", str(tmp_path / "cm.yaml")).stdout)
    assert out["parameters"] == stack(t).parameters


@dataclass(frozen=True)
class Bad:
    what: str
    change: Callable[[dict[str, str], dict[str, str]], None]
    """Edits (the tenant's data, another tenant's data)."""
    says: str
    account: str | None = None

    def __str__(self) -> str:
        return f"{self.what} is refused"


def _set(key: str, value: str) -> Callable[[dict[str, str], dict[str, str]], None]:
    return lambda mine, _: mine.__setitem__(key, value)


def _model(value: str) -> Callable[[dict[str, str], dict[str, str]], None]:
    return lambda mine, _: mine.__setitem__("llmModels", mine["llmModels"] + "," + value)


PROV = "arn:aws:bedrock:us-east-1:111122223333:provisioned-model/x"
BAD = [
    Bad("a config without sessionsTable", lambda mine, _: mine.pop("sessionsTable"), "lacks sessionsTable"),
    Bad("an empty model list", _set("llmModels", " "), "lacks llmModels"),
    Bad("an empty model entry", _set("llmModels", "amazon.nova-lite-v1:0,,amazon.nova-pro-v1:0"), "empty entry"),
    Bad("a repeated model", _set("llmModels", "amazon.nova-lite-v1:0,amazon.nova-lite-v1:0"), "more than once"),
    Bad("a prefix without '/'", _set("documentsPrefix", "tenantx"), "must be a folder"),
    Bad("a prefix with a wildcard", _set("documentsPrefix", "tenant*/"), "wildcard"),
    Bad("a table with a wildcard", _set("sessionsTable", "tenant?-sessions"), "wildcard"),
    Bad("a region in no partition", _set("region", "xx-nowhere-1"), "no AWS partition"),
    Bad("a provisioned model of another region", _model(PROV.replace("us-east-1", "eu-west-1")), "is in region"),
    Bad("a provisioned model of another partition", _model(PROV.replace("aws:", "aws-cn:", 1)), "partition"),
    Bad("a provisioned model of another account", _model(PROV), "not to the stack's account", account="444455556666"),
    Bad("a cross-region inference profile", _model("us.anthropic.claude-3-haiku-20240307-v1:0"), "inference profile"),
    Bad("a custom model ARN", _model(PROV.replace("provisioned-model", "custom-model")), "custom-model"),
    Bad("a model with a wildcard", _model("anthropic.*"), "wildcard"),
    Bad("another tenant's provisioned model",
        lambda mine, theirs: mine.__setitem__("llmModels", theirs["llmModels"]), "one tenant's alone"),
    Bad("another tenant's table", lambda mine, theirs: mine.__setitem__("sessionsTable", theirs["sessionsTable"]),
        "also tenant"),
    Bad("a prefix inside another tenant's",
        lambda mine, theirs: mine.__setitem__("documentsPrefix", theirs["documentsPrefix"] + "sub/"), "overlaps"),
]


@pytest.mark.parametrize("case", BAD, ids=str)
def test_renderer_refuses(case):
    mine, theirs = dict(TENANTS[0].data), dict(TENANTS[1].data)
    case.change(mine, theirs)
    with pytest.raises(tenant_iam.Refused) as refused:
        tenant_iam.render(mine, cluster=CLUSTER, account=case.account,
                          others={TENANTS[0].name: mine, TENANTS[1].name: theirs})
    assert any(case.says in p for p in refused.value.problems), refused.value.problems


def test_cli_refusal_exits_2_and_prints_nothing_to_run(tmp_path):
    data = dict(TENANTS[0].data, documentsPrefix="no-slash")
    (tmp_path / "cm.yaml").write_text(yaml.safe_dump({"kind": "ConfigMap", "data": data}))
    proc = run_tool(TENANTS[0].name, "--cluster", CLUSTER, "--config", str(tmp_path / "cm.yaml"))
    assert proc.returncode == 2 and proc.stdout == ""
    assert f"tenant_iam.py: error: {TENANTS[0].name}: documentsPrefix 'no-slash'" in proc.stderr


# --- the permissions policy: a tiny evaluator ---------------------------------------------------
# It checks only what tenant-iam.yaml uses: Allow statements with Action and Resource (strings
# or lists) and no Condition; IAM's wildcards '*' (any run of characters) and '?' (one), each
# of an ARN's six ':'-separated fields matched on its own, the resource field to the end.


def _wild(pattern: str, value: str, *, fold: bool = False) -> bool:
    regex = "".join(".*" if c == "*" else "." if c == "?" else re.escape(c) for c in pattern)
    return re.fullmatch(regex, value, re.IGNORECASE | re.DOTALL if fold else re.DOTALL) is not None


def arn_like(pattern: str, arn: str) -> bool:
    if pattern == "*":
        return True
    p, a = pattern.split(":", 5), arn.split(":", 5)
    return len(p) == len(a) == 6 and all(_wild(x, y) for x, y in zip(p, a))


def allowed_by(policy: dict[str, Any], action: str, resource: str) -> list[str]:
    """Sids of the statements that allow ``action`` on ``resource``."""
    sids = []
    for s in policy["Statement"]:
        assert s["Effect"] == "Allow" and set(s) <= {"Sid", "Effect", "Action", "Resource"}, \
            f"the evaluator does not understand statement {s}"
        actions = [s["Action"]] if isinstance(s["Action"], str) else s["Action"]
        resources = [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]
        if any(_wild(a, action, fold=True) for a in actions) and any(arn_like(r, resource) for r in resources):
            sids.append(s["Sid"])
    return sids


@pytest.mark.parametrize("pattern, arn, match", [
    ("arn:aws:s3:::b/t/index/*", "arn:aws:s3:::b/t/index/m/manifest.json", True),
    ("arn:aws:s3:::b/t/index/*", "arn:aws:s3:::b/t/corpus/a.md", False),
    ("arn:aws:s3:::b/t/index/*", "arn:aws:s3:::b/tenantb/index/m/x", False),
    ("arn:aws:s3:::b/t?/index/*", "arn:aws:s3:::b/tb/index/x", True),
    ("arn:aws:bedrock:*::foundation-model/a.b:0", "arn:aws:bedrock:eu-west-1::foundation-model/a.b:0", True),
    ("arn:aws:bedrock:us-east-1::foundation-model/a.b:0", "arn:aws:bedrock:us-east-1::foundation-model/a.b:1", False),
    ("arn:aws:dynamodb:*:1:table/t", "arn:aws:dynamodb:us-east-1:2:table/t", False),
])
def test_arn_matcher(pattern, arn, match):
    assert arn_like(pattern, arn) is match


PROBES = [p for t in TENANTS for p in iam.probes(t, TENANTS, account=ACCOUNT)]


@pytest.mark.parametrize("probe", PROBES, ids=str)
def test_rendered_policy_decides_like_the_table(probe):
    policy = permissions(TENANTS[NAMES.index(probe.role_of)])["permissions"]["rag-api"]
    sids = allowed_by(policy, probe.action, probe.resource)
    assert bool(sids) is (probe.expect == iam.ALLOWED), f"{probe}: allowed by {sids or 'nothing'}"


@pytest.mark.parametrize("name", NAMES)
def test_every_grant_has_a_positive_control(name):
    """No statement, and no resource in one, beyond what an allowed row of the table uses."""
    t = TENANTS[NAMES.index(name)]
    policy = permissions(t)["permissions"]["rag-api"]
    used = [p for p in iam.probes(t, TENANTS, account=ACCOUNT) if p.expect == iam.ALLOWED]
    for s in policy["Statement"]:
        for r in [s["Resource"]] if isinstance(s["Resource"], str) else s["Resource"]:
            assert any(arn_like(r, p.resource) for p in used), f"{s['Sid']}: {r} is granted but never needed"


def code_actions() -> set[str]:
    """The IAM actions of the AWS calls in rag_api's service code: attribute calls named
    like an operation of its three clients. ingest.py is left out: it publishes an index
    with the operator's credentials and never runs in the pod."""
    session = botocore.session.get_session()
    operations: dict[str, str] = {}
    for service in ("s3", "dynamodb", "bedrock-runtime"):
        model = session.get_service_model(service)
        for op in model.operation_names:
            operations[botocore.xform_name(op)] = f"{model.signing_name}:{op}"
    # https://docs.aws.amazon.com/bedrock/latest/APIReference/API_runtime_Converse.html
    renamed = {"bedrock:Converse": "bedrock:InvokeModel", "bedrock:ConverseStream": "bedrock:InvokeModelWithResponseStream"}
    found = set()
    for path in sorted((APPS_DIR / "rag_api").glob("*.py")):
        if path.name == "ingest.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in operations:
                action = operations[node.func.attr]
                found.add(renamed.get(action, action))
    return found


def test_granted_actions_are_exactly_what_rag_api_calls():
    from rag_api import index

    granted = set()
    for s in permissions(TENANTS[0])["permissions"]["rag-api"]["Statement"]:
        granted |= {s["Action"]} if isinstance(s["Action"], str) else set(s["Action"])
    assert granted == code_actions() == {"s3:GetObject", iam.MODEL_ACTION, *iam.SESSION_ACTIONS}
    assert iam.INDEX_FILES == index.FILES


def test_a_tenant_added_from_the_template_gets_an_isolated_role():
    """What `make new-tenant NAME=tenantc` writes renders too, and isolates both ways."""
    import new_tenant

    data = yaml.safe_load(new_tenant.render_template(
        PLATFORM / "tenants" / new_tenant.TEMPLATE / "tenant.yaml", new_tenant.choose_ids("tenantc", None, None, {}))
    )["data"]
    c = Tenant.from_config(data)
    everyone = [*TENANTS, c]
    s = tenant_iam.render(data, cluster=CLUSTER, others={t.name: dict(t.data) for t in everyone})
    for t, st in [(c, s), *((t, stack(t)) for t in TENANTS)]:
        policy = tenant_iam.policies(st, account=ACCOUNT)["permissions"]["rag-api"]
        wrong = [p for p in iam.probes(t, everyone, account=ACCOUNT)
                 if bool(allowed_by(policy, p.action, p.resource)) is not (p.expect == iam.ALLOWED)]
        assert not wrong, "\n".join(map(str, wrong))


# --- the trust policy --------------------------------------------------------------------------


def admits(trust: dict[str, Any], tags: dict[str, str]) -> bool:
    """Whether EKS Pod Identity, assuming the role with these session tags, is allowed:
    Allow statements for its service principal, StringEquals on aws:RequestTag/<key> (a
    missing tag fails the condition). Nothing else is understood."""
    for s in trust["Statement"]:
        assert s["Effect"] == "Allow" and set(s.get("Condition", {})) <= {"StringEquals"}, s
        if s["Principal"] != {"Service": iam.POD_IDENTITY} or "sts:AssumeRole" not in s["Action"]:
            continue
        wanted = {k.split("/", 1)[1]: v for k, v in s.get("Condition", {}).get("StringEquals", {}).items()}
        if all(tags.get(k) in (v if isinstance(v, list) else [v]) for k, v in wanted.items()):
            return True
    return False


def pod_tags(namespace: str, service_account: str, cluster: str, region: str) -> dict[str, str]:
    return {"eks-cluster-arn": f"arn:aws:eks:{region}:{ACCOUNT}:cluster/{cluster}", "eks-cluster-name": cluster,
            "kubernetes-namespace": namespace, "kubernetes-service-account": service_account,
            "kubernetes-pod-name": "rag-api-0", "kubernetes-pod-uid": "0"}


@pytest.mark.parametrize("name", NAMES)
def test_trust_admits_only_the_tenants_rag_api(name):
    t = TENANTS[NAMES.index(name)]
    trust = permissions(t)["trust"]
    rows = [(ns, sa, cluster) for ns in NAMES for sa in ("rag-api", "app-ui") for cluster in (CLUSTER, "other")]
    wrong = [row for row in rows if admits(trust, pod_tags(*row, t.region)) != (row == (name, "rag-api", CLUSTER))]
    assert not wrong, f"{name}'s role: wrong decision for (namespace, service account, cluster) {wrong}"
    assert not admits(trust, {}), "admitted a session without tags"
    assert iam.trust_problems(trust, name, cluster=CLUSTER) == []
    widened = json.loads(json.dumps(trust).replace('"StringEquals"', '"StringLike"'))
    assert iam.trust_problems(widened, name, cluster=CLUSTER), "a StringLike trust policy went unnoticed"


# --- moto: the stack deploys, and S3 enforces the role's policy ----------------------------------


def test_stack_deploys_in_moto_and_s3_enforces_the_role():
    """moto's CloudFormation creates the role and its policy; it does not implement
    AWS::EKS::PodIdentityAssociation and skips it with a warning (asserted, so a moto that
    starts creating it makes this test say so). With IAM access control on, moto checks S3
    object ARNs against the role's policy (DynamoDB only against '*', so not tested here)."""
    from moto import mock_aws
    from moto.core import set_initial_no_auth_action_count

    region, body = TENANTS[0].region, TEMPLATE.read_text()
    with mock_aws():
        cfn, iam_client, s3 = (boto3.client(s, region_name=region) for s in ("cloudformation", "iam", "s3"))
        account = boto3.client("sts", region_name=region).get_caller_identity()["Account"]
        creds = {}
        for t in TENANTS:
            s = stack(t)
            with pytest.warns(UserWarning, match="AWS::EKS::PodIdentityAssociation"):
                cfn.create_stack(StackName=s.name, TemplateBody=body, Capabilities=["CAPABILITY_NAMED_IAM"],
                                 Parameters=[{"ParameterKey": k, "ParameterValue": v} for k, v in s.parameters.items()])
            described = cfn.describe_stacks(StackName=s.name)["Stacks"][0]
            assert described["StackStatus"] == "CREATE_COMPLETE"
            outputs = {o["OutputKey"]: o["OutputValue"] for o in described["Outputs"]}
            expected = tenant_iam.policies(s, account=account)
            assert outputs["RoleArn"] == f"arn:aws:iam::{account}:role/{expected['role']}"
            role = iam_client.get_role(RoleName=expected["role"])["Role"]
            assert role["AssumeRolePolicyDocument"] == expected["trust"]
            # moto keeps a Role's inline `Policies` as the Python dict and answers with its repr
            # (and its access control cannot read it): compare the repr's value, then store
            # the very same document as JSON, as AWS would have it, for the S3 checks below.
            stored = iam_client.get_role_policy(RoleName=expected["role"], PolicyName="rag-api")["PolicyDocument"]
            stored = ast.literal_eval(stored) if isinstance(stored, str) else stored
            assert stored == expected["permissions"]["rag-api"]
            iam_client.put_role_policy(RoleName=expected["role"], PolicyName="rag-api",
                                       PolicyDocument=json.dumps(stored))
            with pytest.warns(UserWarning, match="AWS::EKS::PodIdentityAssociation"):  # moto parses it again
                listed = cfn.list_stack_resources(StackName=s.name)["StackResourceSummaries"]
            kinds = {r["LogicalResourceId"]: r["ResourceType"] for r in listed}
            assert kinds.get("Role") == "AWS::IAM::Role", kinds
            assert kinds.get("PodIdentity") != "AWS::EKS::PodIdentityAssociation", kinds  # skipped, as warned
            creds[t.name] = boto3.client("sts", region_name=region).assume_role(
                RoleArn=outputs["RoleArn"], RoleSessionName="probe")["Credentials"]
        for t in TENANTS:
            if t.data["documentsBucket"] not in {b["Name"] for b in s3.list_buckets()["Buckets"]}:
                s3.create_bucket(Bucket=t.data["documentsBucket"])
        rows = [p for t in TENANTS for p in iam.probes(t, TENANTS, account=account)
                if p.action == "s3:GetObject"]
        for p in rows:
            bucket, key = p.resource.split(":::", 1)[1].split("/", 1)
            s3.put_object(Bucket=bucket, Key=key, Body=b"x")

        @set_initial_no_auth_action_count(0)
        def decide() -> list[str]:
            wrong = []
            for p in rows:
                c = creds[p.role_of]
                client = boto3.client("s3", region_name=region, aws_access_key_id=c["AccessKeyId"],
                                      aws_secret_access_key=c["SecretAccessKey"], aws_session_token=c["SessionToken"])
                bucket, key = p.resource.split(":::", 1)[1].split("/", 1)
                try:
                    client.get_object(Bucket=bucket, Key=key)["Body"].read()
                    got = iam.ALLOWED
                except ClientError as exc:
                    assert exc.response["Error"]["Code"] == "AccessDenied", exc.response
                    got = iam.DENIED
                if got != p.expect:
                    wrong.append(f"{p}: moto says {got}")
            return wrong

        assert any(p.expect == iam.ALLOWED for p in rows) and any(p.expect == iam.DENIED for p in rows)
        assert decide() == []


# --- fixtures/eks/iam.py against a stubbed IAM (request construction, reading the answers) ------


def clients() -> dict[str, Any]:
    return {s: boto3.client(s, region_name="us-east-1", aws_access_key_id="k", aws_secret_access_key="s")
            for s in ("iam", "cloudformation", "sts")}


def simulation(action: str, resources: list[str], decide: Callable[[str], str], *, marker: str | None = None,
               per_resource: bool = False) -> dict[str, Any]:
    """A SimulatePrincipalPolicy answer in either of IAM's shapes: one result per resource,
    or one per action with ResourceSpecificResults."""
    def matched(r: str) -> list[dict[str, Any]]:
        return [{"SourcePolicyId": "rag-api", "SourcePolicyType": "IAM Policy",
                 "StartPosition": {"Line": 1, "Column": 7}}] if decide(r) == "allowed" else []
    if per_resource:
        results = [{"EvalActionName": action, "EvalResourceName": "*", "EvalDecision": "implicitDeny",
                    "ResourceSpecificResults": [{"EvalResourceName": r, "EvalResourceDecision": decide(r),
                                                 "MatchedStatements": matched(r)} for r in resources]}]
    else:
        results = [{"EvalActionName": action, "EvalResourceName": r, "EvalDecision": decide(r),
                    "MatchedStatements": matched(r)} for r in resources]
    return {"EvaluationResults": results, "IsTruncated": marker is not None, **({"Marker": marker} if marker else {})}


def stub_check(t: Tenant, role_arn: str, decide: Callable[[str, str], str]) -> tuple[iam.IamLayer, list[Stubber]]:
    """An IamLayer whose stack output names ``role_arn``; IAM answers each action's
    resources with ``decide(action, resource)`` (the first action in two pages)."""
    c = clients()
    cfn, iam_stub = Stubber(c["cloudformation"]), Stubber(c["iam"])
    cfn.add_response("describe_stacks", {"Stacks": [{
        "StackName": iam.stack_name(t.name), "CreationTime": "2026-01-01T00:00:00Z", "StackStatus": "CREATE_COMPLETE",
        "Outputs": [{"OutputKey": "RoleArn", "OutputValue": role_arn}]}]}, {"StackName": iam.stack_name(t.name)})
    rows = iam.probes(t, TENANTS, account=role_arn.split(":")[4])
    actions = list(dict.fromkeys(p.action for p in rows))
    for n, action in enumerate(actions):
        resources = list(dict.fromkeys(p.resource for p in rows if p.action == action))
        request = {"PolicySourceArn": role_arn, "ActionNames": [action], "ResourceArns": resources}
        answer = lambda r, a=action: decide(a, r)  # noqa: E731
        if n == 0:
            half = len(resources) // 2
            iam_stub.add_response("simulate_principal_policy", simulation(action, resources[:half], answer, marker="m2"),
                                  request)
            iam_stub.add_response("simulate_principal_policy", simulation(action, resources[half:], answer),
                                  {**request, "Marker": "m2"})
        else:
            iam_stub.add_response("simulate_principal_policy",
                                  simulation(action, resources, answer, per_resource=n % 2 == 1), request)
    return iam.IamLayer(c["iam"], cloudformation=c["cloudformation"], sts=c["sts"]), [cfn, iam_stub]


def as_expected(t: Tenant, account: str) -> Callable[[str, str], str]:
    allowed = {(p.action, p.resource) for p in iam.probes(t, TENANTS, account=account) if p.expect == iam.ALLOWED}
    return lambda action, resource: "allowed" if (action, resource) in allowed else "implicitDeny"


def test_live_check_asks_per_action_and_reads_every_page_and_shape():
    t, role = TENANTS[0], f"arn:aws:iam::{ACCOUNT}:role/{TENANTS[0].name}-rag-api"
    layer, stubs = stub_check(t, role, as_expected(t, ACCOUNT))
    with stubs[0], stubs[1]:
        decisions = layer.check(t, TENANTS)
    for s in stubs:
        s.assert_no_pending_responses()
    assert decisions and all(d.ok for d in decisions), "\n".join(str(d) for d in decisions if not d.ok)
    assert {d.probe for d in decisions} == set(iam.probes(t, TENANTS, account=ACCOUNT))
    allowed = [d for d in decisions if d.decision == "allowed"]
    assert allowed and all(d.statements == ("IAM Policy rag-api line 1 column 7",) for d in allowed)


def test_live_check_reports_a_leak_with_the_statement_that_allowed_it():
    t = TENANTS[0]
    role = f"arn:aws:iam::{ACCOUNT}:role/{t.name}-rag-api"
    leak = next(p for p in iam.probes(t, TENANTS, account=ACCOUNT) if p.owner != t.name and p.action == "s3:GetObject")
    expected = as_expected(t, ACCOUNT)
    layer, stubs = stub_check(t, role, lambda a, r: "allowed" if (a, r) == (leak.action, leak.resource) else expected(a, r))
    with stubs[0], stubs[1]:
        wrong = [d for d in layer.check(t, TENANTS) if not d.ok]
    assert [d.probe for d in wrong] == [leak]
    assert str(wrong[0]).startswith("WRONG: ") and "IAM says allowed by IAM Policy rag-api line 1" in str(wrong[0])


def test_role_without_a_stack_is_named_in_the_callers_account_and_partition():
    c = clients()
    cfn, sts = Stubber(c["cloudformation"]), Stubber(c["sts"])
    cfn.add_client_error("describe_stacks", "ValidationError", "Stack with id tenanta-rag-api-iam does not exist")
    sts.add_response("get_caller_identity", {"Account": "210987654321", "UserId": "AIDA",
                                             "Arn": "arn:aws-cn:iam::210987654321:user/suite"})
    with cfn, sts:
        arn = iam.IamLayer(c["iam"], cloudformation=c["cloudformation"], sts=c["sts"]).role_arn("tenanta")
    assert arn == "arn:aws-cn:iam::210987654321:role/tenanta-rag-api"
    cfn, c2 = Stubber(c["cloudformation"]), c
    cfn.add_client_error("describe_stacks", "AccessDenied", "not allowed")
    with cfn, pytest.raises(ClientError):  # a real error is not mistaken for "no stack"
        iam.IamLayer(c2["iam"], cloudformation=c2["cloudformation"], sts=c2["sts"]).role_arn("tenanta")


def test_live_trust_check_reads_the_role():
    t, c = TENANTS[0], clients()
    trust = permissions(t)["trust"]
    stub = Stubber(c["iam"])
    for doc in (trust, {**trust, "Statement": [{**trust["Statement"][0], "Principal": {"AWS": "*"}}]}):
        stub.add_response("get_role", {"Role": {"Path": "/", "RoleName": f"{t.name}-rag-api", "RoleId": "AROAEXAMPLE12345",
                                                "Arn": f"arn:aws:iam::{ACCOUNT}:role/{t.name}-rag-api",
                                                "CreateDate": "2026-01-01T00:00:00Z",
                                                # on the wire: URL-encoded JSON (botocore decodes it)
                                                "AssumeRolePolicyDocument": quote(json.dumps(doc))}},
                          {"RoleName": f"{t.name}-rag-api"})
    with stub:
        layer = iam.IamLayer(c["iam"], account=ACCOUNT)
        assert layer.trust_problems(t, cluster=CLUSTER) == []
        assert "not only pods.eks.amazonaws.com" in "".join(layer.trust_problems(t, cluster=CLUSTER))


@pytest.mark.parametrize("context, cluster", [
    ("arn:aws:eks:eu-west-1:111122223333:cluster/prod", ("eu-west-1", "prod")),
    ("arn:aws-cn:eks:cn-north-1:111122223333:cluster/prod-2", ("cn-north-1", "prod-2")),
    ("kind-tenant-mesh", None),
    ("arn:aws:iam::111122223333:role/cluster/x", None),
])
def test_cluster_of_a_kube_context(context, cluster):
    assert iam.cluster_of_context(context) == cluster
