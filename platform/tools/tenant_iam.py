#!/usr/bin/env python3
"""Render the IAM stack of one tenant's rag-api on EKS (platform/aws/tenant-iam.yaml).

    python platform/tools/tenant_iam.py TENANT --cluster NAME [--cluster-region REGION]
        [--account ID] [--config FILE] [--platform-dir DIR] [--json | --show-policy]

Reads the tenant's tenant.yaml (or, with --config, a ConfigMap as the cluster has it:
`kubectl get configmap tenant -n TENANT -o yaml`) and prints the stack's parameter
overrides and the exact `aws cloudformation deploy` command that creates or updates stack
TENANT-rag-api-iam in the cluster's region (default: the tenant's). It never calls AWS.
--json prints {stack, parameters, argv}; --show-policy prints the trust and permission
policies the stack will create, resolved for these parameters (for review).

Refused, before anything is printed: a config without the keys the policy is built from; a
prefix not ending in '/', or a name holding an IAM wildcard ('*', '?') or '$' (a wildcard
in a resource name would widen the grant to other tenants); an empty or repeated model; a
model ARN of another partition or region than the tenant's, of another account than
--account, or of a kind the template does not grant (inference profiles, custom models); a
provisioned model, a table or an overlapping prefix in the same bucket that another tenant
of the catalog also names. Exit status 0, or 2 with one line per problem.
Stdlib, PyYAML and botocore (its offline partition table) only.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

import check_catalog

PLATFORM_DIR = Path(__file__).resolve().parents[1]
TEMPLATE = Path("aws") / "tenant-iam.yaml"
SERVICE_ACCOUNT = "rag-api"
REQUIRED = ("name", "region", "documentsBucket", "documentsPrefix", "sessionsTable", "llmModels")

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")
_REGION = re.compile(r"[a-z]{2}(-[a-z]+)+-[0-9]+")
_ACCOUNT = re.compile(r"[0-9]{12}")
_CLUSTER = re.compile(r"[0-9A-Za-z][A-Za-z0-9_-]{0,99}")
_MODEL_ID = re.compile(r"[a-z0-9-]+\.[A-Za-z0-9._:-]+")
_ARN = re.compile(r"arn:(?P<partition>[^:]+):bedrock:(?P<region>[^:]*):(?P<account>[^:]*):(?P<kind>[^/]+)/(?P<id>.+)")
# A model id that starts with a geography is a cross-region inference profile; invoking one
# needs the profile's ARN and its foundation model in every region it routes to.
_PROFILE_GEOGRAPHIES = ("us", "eu", "apac", "us-gov", "global", "jp", "au", "ca")
_WILDCARDS = ("*", "?", "$")


class Refused(ValueError):
    """The tenant's configuration cannot be rendered; ``problems`` has one line each."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


@dataclass(frozen=True)
class Stack:
    tenant: str
    region: str
    """The cluster's region, where the stack (and its pod identity association) lives."""
    parameters: dict[str, str]
    template: Path

    @property
    def name(self) -> str:
        return f"{self.tenant}-rag-api-iam"

    def argv(self, cwd: Path | None = None) -> list[str]:
        """The deploy command, with the template path relative to ``cwd`` when inside it."""
        template = Path(os.path.relpath(self.template, cwd)) if cwd and _inside(self.template, cwd) else self.template
        return ["aws", "cloudformation", "deploy", "--template-file", template.as_posix(),
                "--stack-name", self.name, "--region", self.region,
                "--capabilities", "CAPABILITY_NAMED_IAM", "--no-fail-on-empty-changeset",
                "--tags", f"platform.example.com/tenant={self.tenant}",
                "--parameter-overrides", *(f"{k}={v}" for k, v in self.parameters.items())]


def _inside(path: Path, folder: Path) -> bool:
    try:
        path.resolve().relative_to(folder.resolve())
    except ValueError:
        return False
    return True


@functools.lru_cache(maxsize=None)  # botocore reads its endpoint data anew for every session
def partition_of(region: str) -> str:
    """The AWS partition of ``region`` (botocore's bundled endpoint data; no network)."""
    import botocore.session
    from botocore.exceptions import UnknownRegionError

    try:
        return botocore.session.get_session().get_partition_for_region(region)
    except UnknownRegionError:
        raise Refused([f"region {region!r} is in no AWS partition botocore knows"]) from None


def load_config(path: Path, tenant: str) -> dict[str, str]:
    """The `data` of the tenant's ConfigMap in ``path`` (tenant.yaml, or a rendered file)."""
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]
    except (OSError, yaml.YAMLError) as exc:
        raise Refused([f"{path}: cannot read a ConfigMap: {exc}"]) from None
    found = [d for d in docs if d.get("kind") == "ConfigMap" and isinstance(d.get("data"), dict)
             and d["data"].get("name") == tenant]
    if len(found) != 1:
        raise Refused([f"{path}: expected one ConfigMap whose data.name is {tenant!r}, found {len(found)}"])
    return {str(k): str(v) for k, v in found[0]["data"].items()}


def catalog(platform_dir: Path) -> dict[str, dict[str, str]]:
    """tenant -> tenant.yaml data, for every tenant folder of the platform."""
    out = {}
    for name in check_catalog.tenant_folders(platform_dir):
        path = platform_dir / "tenants" / name / "tenant.yaml"
        if path.is_file():
            out[name] = load_config(path, name)
    return out


def listed(value: str) -> list[str]:
    return [item.strip() for item in value.split(",")]


def model_arn(model: str, *, region: str, partition: str, account: str | None) -> tuple[str | None, str | None]:
    """(ARN, None) for a model of tenant.yaml `llmModels`, or (None, why it is refused)."""
    if any(c in model for c in _WILDCARDS):
        return None, "holds an IAM wildcard or '$'"
    match = _ARN.fullmatch(model)
    if match is None:
        if not _MODEL_ID.fullmatch(model):
            return None, "is neither a Bedrock model id (provider.model) nor a bedrock ARN"
        if model.split(".", 1)[0] in _PROFILE_GEOGRAPHIES:
            return None, "is an inference profile id; the template grants foundation and provisioned models only"
        return f"arn:{partition}:bedrock:{region}::foundation-model/{model}", None
    arn = match.groupdict()
    if arn["partition"] != partition:
        return None, f"is in partition {arn['partition']}, the tenant's region {region} in {partition}"
    if arn["region"] != region:
        return None, f"is in region {arn['region']!r}; rag-api calls Bedrock in the tenant's region {region}"
    if arn["kind"] == "foundation-model" and not arn["account"]:
        return model, None
    if arn["kind"] != "provisioned-model":
        return None, f"is a {arn['kind']}; the template grants foundation and provisioned models only"
    if not _ACCOUNT.fullmatch(arn["account"]):
        return None, f"names account {arn['account']!r}, not a 12-digit account id"
    if account is not None and arn["account"] != account:
        return None, f"belongs to account {arn['account']}, not to the stack's account {account}"
    return model, None


def _overlap(a: str, b: str) -> bool:
    return a.startswith(b) or b.startswith(a)


def render(data: dict[str, str], *, cluster: str, cluster_region: str | None = None, account: str | None = None,
           others: dict[str, dict[str, str]] | None = None, template: Path = PLATFORM_DIR / TEMPLATE) -> Stack:
    """The stack of the tenant configured by ``data``; ``others`` are the other tenants
    of the catalog (name -> data), checked for resources this tenant would share."""
    problems = [f"tenant config lacks {key}" for key in REQUIRED if not data.get(key, "").strip()]
    if problems:
        raise Refused(problems)
    name, region = data["name"].strip(), data["region"].strip()
    bucket, prefix, table = (data[k].strip() for k in ("documentsBucket", "documentsPrefix", "sessionsTable"))
    cluster_region = cluster_region or region
    if not _DNS_LABEL.fullmatch(name):
        problems.append(f"name {name!r} is not a DNS label (it is the namespace)")
    for what, value in (("region", region), ("cluster region", cluster_region)):
        if not _REGION.fullmatch(value):
            problems.append(f"{what} {value!r} is not an AWS region")
    if not _CLUSTER.fullmatch(cluster):
        problems.append(f"cluster {cluster!r} is not an EKS cluster name")
    if account is not None and not _ACCOUNT.fullmatch(account):
        problems.append(f"account {account!r} is not a 12-digit account id")
    for key, value in (("documentsBucket", bucket), ("documentsPrefix", prefix), ("sessionsTable", table)):
        if any(c in value for c in _WILDCARDS):
            problems.append(f"{key} {value!r} holds an IAM wildcard or '$': the grant would reach other names")
    if not prefix.endswith("/") or prefix.startswith("/") or "//" in prefix:
        problems.append(f"documentsPrefix {prefix!r} must be a folder: end in '/', not start with '/'")
    if problems:
        raise Refused(problems)
    partition = partition_of(region)
    if partition_of(cluster_region) != partition:
        problems.append(f"cluster region {cluster_region} is in partition {partition_of(cluster_region)}, "
                        f"the tenant's region {region} in {partition}")
    models = listed(data["llmModels"])
    arns = []
    if any(not m for m in models):
        problems.append(f"llmModels {data['llmModels']!r} has an empty entry")
    for model in filter(None, models):
        arn, why = model_arn(model, region=region, partition=partition, account=account)
        if why:
            problems.append(f"llmModels: {model!r} {why}")
        elif arn in arns:
            problems.append(f"llmModels: {model!r} is listed more than once")
        else:
            arns.append(arn)
    for other, their in sorted((others or {}).items()):
        if other == name:
            continue
        if their.get("sessionsTable", "").strip() == table:
            problems.append(f"sessionsTable {table} is also tenant {other}'s")
        their_prefix = their.get("documentsPrefix", "").strip()
        if their.get("documentsBucket", "").strip() == bucket and _overlap(prefix, their_prefix):
            problems.append(f"documentsPrefix {prefix} overlaps tenant {other}'s {their_prefix!r} in bucket {bucket}")
        for model in listed(their.get("llmModels", "")):
            if ":provisioned-model/" in model and model in arns:
                problems.append(f"llmModels: provisioned model {model} is also listed by tenant {other}; "
                                "a provisioned model is one tenant's alone")
    if problems:
        raise Refused(problems)
    parameters = {"TenantId": name, "TenantRegion": region, "DocumentsBucket": bucket, "DocumentsPrefix": prefix,
                  "SessionsTable": table, "LlmModelArns": ",".join(arns), "ClusterName": cluster}
    return Stack(name, cluster_region, parameters, template)


# --- what the stack will create, for review ---------------------------------------------------


def load_template(path: Path) -> dict[str, Any]:
    """The template (long-form intrinsics only, so plain YAML reads it)."""
    return yaml.safe_load(path.read_text())


_SUB = re.compile(r"\$\{([^}]*)\}")


def resolve(node: Any, template: dict[str, Any], parameters: dict[str, str], *, account: str, region: str) -> Any:
    """``node`` with Ref, Fn::Sub and Fn::GetAtt <resource>.Arn of an IAM role resolved the
    way CloudFormation would for these parameters, account and (stack) region. Only what
    tenant-iam.yaml uses is supported; anything else raises ValueError, so the template
    cannot grow beyond what this (and the tests built on it) understands."""
    declared = template.get("Parameters", {})
    pseudo = {"AWS::Partition": partition_of(region), "AWS::Region": region, "AWS::AccountId": account}

    def ref(name: str) -> Any:
        if name in pseudo:
            return pseudo[name]
        if name not in declared:
            raise ValueError(f"Ref to {name!r}, which is no parameter")
        value = parameters[name]
        return listed(value) if declared[name]["Type"] == "CommaDelimitedList" else value

    def get_att(logical: str, attribute: str) -> str:
        resource = template["Resources"].get(logical, {})
        if resource.get("Type") != "AWS::IAM::Role" or attribute != "Arn":
            raise ValueError(f"Fn::GetAtt {logical}.{attribute} is not supported here")
        name = walk(resource["Properties"]["RoleName"])
        return f"arn:{pseudo['AWS::Partition']}:iam::{account}:role/{name}"

    def sub(text: str) -> str:
        def one(match: re.Match[str]) -> str:
            name = match.group(1)
            if name.startswith("!"):
                return "${" + name[1:] + "}"
            if "." in name:
                return get_att(*name.split(".", 1))
            value = ref(name)
            if not isinstance(value, str):
                raise ValueError(f"Fn::Sub of list parameter {name}")
            return value
        return _SUB.sub(one, text)

    def walk(value: Any) -> Any:
        if isinstance(value, list):
            return [walk(v) for v in value]
        if not isinstance(value, dict):
            return value
        if len(value) == 1:
            (key, arg), = value.items()
            if key == "Ref":
                return ref(arg)
            if key == "Fn::Sub":
                if not isinstance(arg, str):
                    raise ValueError("only the one-argument form of Fn::Sub is supported")
                return sub(arg)
            if key == "Fn::GetAtt":
                return get_att(*arg)
            if key.startswith("Fn::"):
                raise ValueError(f"{key} is not supported by this resolver")
        return {k: walk(v) for k, v in value.items()}

    return walk(node)


def policies(stack: Stack, *, account: str) -> dict[str, Any]:
    """{"trust": ..., "permissions": {policy name: document}} of the stack's role."""
    template = load_template(stack.template)
    role = resolve(template["Resources"]["Role"]["Properties"], template, stack.parameters,
                   account=account, region=stack.region)
    return {"role": role["RoleName"], "trust": role["AssumeRolePolicyDocument"],
            "permissions": {p["PolicyName"]: p["PolicyDocument"] for p in role.get("Policies", [])}}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tenant_iam.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("tenant", metavar="TENANT", help="the tenant (its folder under platform/tenants)")
    parser.add_argument("--cluster", required=True, help="the EKS cluster whose rag-api pods get the role")
    parser.add_argument("--cluster-region", help="the cluster's region (default: the tenant's region)")
    parser.add_argument("--account", help="the stack's account: provisioned models must belong to it")
    parser.add_argument("--config", type=Path, help="a ConfigMap file to read instead of the tenant's tenant.yaml")
    parser.add_argument("--platform-dir", type=Path, default=PLATFORM_DIR, help="the platform/ folder")
    output = parser.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true", help="print {stack, parameters, argv} as JSON")
    output.add_argument("--show-policy", action="store_true", help="print the policies the stack creates")
    args = parser.parse_args(argv)
    platform_dir = args.platform_dir.resolve()
    try:
        others = catalog(platform_dir)
        if args.config is None and args.tenant not in others:
            raise Refused([f"no tenant folder tenants/{args.tenant} (tenants: {', '.join(others) or 'none'})"])
        config = args.config or platform_dir / "tenants" / args.tenant / "tenant.yaml"
        data = load_config(config, args.tenant)
        stack = render(data, cluster=args.cluster, cluster_region=args.cluster_region, account=args.account,
                       others=others, template=platform_dir / TEMPLATE)
    except Refused as exc:
        for problem in exc.problems:
            print(f"{parser.prog}: error: {args.tenant}: {problem}", file=sys.stderr)
        return 2
    argv_out = stack.argv(Path.cwd())
    if args.json:
        print(json.dumps({"stack": stack.name, "region": stack.region, "parameters": stack.parameters,
                          "argv": argv_out}, indent=2))
    elif args.show_policy:
        print(json.dumps(policies(stack, account=args.account or "<account>"), indent=2))
    else:
        print(f"# parameters of stack {stack.name} ({argv_out[4]}, region {stack.region})")
        for key, value in stack.parameters.items():
            print(f"{key}={value}")
        print("# deploy with credentials that may create IAM roles and EKS pod identity associations:")
        print(shlex.join(argv_out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
