"""What the conformance suite needs of a new tenant outside the platform's overlays: the
suite's RoleBindings in the tenant's namespace (platform/suite-rbac, its rights on a shared
cluster) and, in the nightly EKS workflow, the environment variables that carry the
passwords of the tenant's test users (named by fixtures/eks/users.yaml).

Both files are edited as text, so comments and layout stay: a RoleBinding is appended as
one more document, password variables are inserted as lines of the job's `env:` block.
Each edit is checked by reading the result back; a file whose shape is not the expected
one is refused (ShapeError) rather than guessed at. An entry already there is kept once.
Used by new_tenant.py; stdlib + PyYAML only.
"""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import yaml

#: Relative to the platform folder: one RoleBinding per tenant namespace in each.
BINDING_FILES = (Path("suite-rbac") / "tenant-bindings.yaml", Path("suite-rbac") / "destructive" / "roles.yaml")
#: Relative to the repository (the platform folder's parent).
NIGHTLY_WORKFLOW = Path(".github") / "workflows" / "nightly-eks.yml"
EKS_USERS = Path("fixtures") / "eks" / "users.yaml"
#: The step of the nightly job that runs the suites (its dry run needs no passwords).
SUITE_RUN = re.compile(r"\bmake test-eks\b(?!.*\bDRY_RUN=)")


class ShapeError(ValueError):
    """A file does not have the shape this tool knows how to edit; nothing was written."""


class _BlockDumper(yaml.SafeDumper):
    """Indents list items under their key ("  - kind: ..."), as the platform's files do."""

    def increase_indent(self, flow: bool = False, indentless: bool = False) -> Any:
        return super().increase_indent(flow, False)


# --- platform/suite-rbac ------------------------------------------------------------------


def with_role_binding(path: Path, namespace: str) -> str | None:
    """The text of ``path`` with a RoleBinding for ``namespace`` appended, a copy of the
    file's RoleBindings (which must agree on name, role and subjects), or None when
    ``namespace`` already has one."""
    text = path.read_text()
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as exc:
        raise ShapeError(f"{path}: not valid YAML: {exc}") from None
    bindings = [d for d in docs if isinstance(d, dict) and d.get("kind") == "RoleBinding"]
    if not bindings:
        raise ShapeError(f"{path}: no RoleBinding to copy for namespace {namespace}; add it by hand")
    shapes = {yaml.safe_dump({"name": (b.get("metadata") or {}).get("name"), "roleRef": b.get("roleRef"),
                              "subjects": b.get("subjects")}) for b in bindings}
    if len(shapes) != 1:
        raise ShapeError(f"{path}: its RoleBindings differ in name, roleRef or subjects, so which one a new "
                         f"tenant gets is not clear; add the one for namespace {namespace} by hand")
    if any((b.get("metadata") or {}).get("namespace") == namespace for b in bindings):
        return None
    new = copy.deepcopy(bindings[0])
    new["metadata"]["namespace"] = namespace
    rendered = yaml.dump(new, Dumper=_BlockDumper, sort_keys=False, default_flow_style=False)
    new_text = text + ("" if text.endswith("\n") else "\n") + "---\n" + rendered
    after = [d for d in yaml.safe_load_all(new_text) if d is not None]
    if after != docs + [new]:
        raise ShapeError(f"{path}: appending the RoleBinding for {namespace} as text did not give the expected "
                         "documents; add it by hand")
    return new_text


# --- the nightly EKS workflow -------------------------------------------------------------


def _fill(template: str, tenant: str) -> str:
    # The placeholders of fixtures/eks/users.yaml (fixtures.eks.cognito fills them the same way).
    return template.replace("{tenant}", tenant).replace("{TENANT}", tenant.upper().replace("-", "_"))


def password_envs(users_file: Path, tenant: str) -> list[str]:
    """The environment variables holding the passwords of ``tenant``'s test users."""
    try:
        data = yaml.safe_load(users_file.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ShapeError(f"{users_file}: not valid YAML: {exc}") from None
    users = data.get("users") if isinstance(data, dict) else None
    overrides = (data.get("tenants") or {}) if isinstance(data, dict) else {}
    if not isinstance(users, dict) or not isinstance(overrides, dict):
        raise ShapeError(f"{users_file}: expected mappings `users` and `tenants`")
    entries = {**users, **(overrides.get(tenant) or {})}
    envs = []
    for alias, entry in entries.items():
        if not isinstance(entry, dict) or not isinstance(entry.get("passwordEnv"), str):
            raise ShapeError(f"{users_file}: user {alias!r} has no passwordEnv")
        envs.append(_fill(entry["passwordEnv"], tenant))
    return envs


def _get(node: yaml.Node, key: str) -> yaml.Node | None:
    if isinstance(node, yaml.MappingNode):
        for k, v in node.value:
            if isinstance(k, yaml.ScalarNode) and k.value == key:
                return v
    return None


def _suite_step(path: Path, root: yaml.Node) -> yaml.MappingNode:
    """The one step of the workflow that runs the suites against EKS."""
    found = []
    jobs = _get(root, "jobs")
    for _, job in (jobs.value if isinstance(jobs, yaml.MappingNode) else []):
        steps = _get(job, "steps")
        for step in (steps.value if isinstance(steps, yaml.SequenceNode) else []):
            run = _get(step, "run")
            if isinstance(run, yaml.ScalarNode) and SUITE_RUN.search(run.value):
                found.append(step)
    if len(found) != 1:
        raise ShapeError(f"{path}: expected one step running `make test-eks` (not its dry run), found {len(found)}")
    return found[0]


def with_password_env(path: Path, envs: list[str]) -> str | None:
    """The text of the nightly workflow with ``NAME: ${{ secrets.NAME }}`` added to the
    `env:` of its suite step for each of ``envs`` missing there, or None when none is."""
    text = path.read_text()
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        raise ShapeError(f"{path}: not valid YAML: {exc}") from None
    step = _suite_step(path, root)
    env = _get(step, "env")
    if not isinstance(env, yaml.MappingNode) or env.flow_style or not env.value:
        raise ShapeError(f"{path}: the `make test-eks` step has no block `env:` mapping to add "
                         f"{', '.join(envs)} to; add them by hand")
    present = {k.value for k, _ in env.value}
    missing = [e for e in envs if e not in present]
    if not missing:
        return None
    # After the last password variable (or the last variable), at the keys' indentation.
    passwords = [(k, v) for k, v in env.value if k.value.endswith("_PASSWORD")]
    key, value = (passwords or env.value)[-1]
    if value.end_mark.line != key.start_mark.line:
        raise ShapeError(f"{path}: env entry {key.value} spans several lines; add {', '.join(missing)} by hand")
    lines = text.splitlines(keepends=True)
    at = key.start_mark.line + 1
    indent = " " * key.start_mark.column
    if not lines[at - 1].endswith("\n"):
        lines[at - 1] += "\n"
    lines[at:at] = [f"{indent}{name}: ${{{{ secrets.{name} }}}}\n" for name in missing]
    new_text = "".join(lines)

    def step_env(t: str) -> dict[str, Any]:
        doc = yaml.safe_load(t)
        for job in (doc.get("jobs") or {}).values():
            for s in job.get("steps") or []:
                if SUITE_RUN.search(str(s.get("run", ""))):
                    return dict(s.get("env") or {})
        return {}

    expected = {**step_env(text), **{name: f"${{{{ secrets.{name} }}}}" for name in missing}}
    if step_env(new_text) != expected:
        raise ShapeError(f"{path}: adding {', '.join(missing)} as text did not give the expected env; add them by hand")
    return new_text


# --- both, for new_tenant.py --------------------------------------------------------------


def edits(platform_dir: Path, tenant: str) -> tuple[dict[Path, str], list[str]]:
    """(path -> new text for every file that changes, notes for the person running it).
    Raises ShapeError before anything is written."""
    out: dict[Path, str] = {}
    notes: list[str] = []
    for rel in BINDING_FILES:
        path = platform_dir / rel
        if not path.is_file():
            raise ShapeError(f"no {rel.as_posix()} in {platform_dir}: the suite's RoleBinding for {tenant} has "
                             "nowhere to go")
        text = with_role_binding(path, tenant)
        if text is not None:
            out[path] = text
    repo = platform_dir.parent
    workflow, users = repo / NIGHTLY_WORKFLOW, repo / EKS_USERS
    if not workflow.is_file():
        notes.append(f"no {NIGHTLY_WORKFLOW.as_posix()} beside this platform folder: pass the passwords of "
                     f"{tenant}'s test users to the nightly EKS job by hand")
        return out, notes
    if not users.is_file():
        raise ShapeError(f"no {EKS_USERS.as_posix()} in {repo}: cannot name the password variables of {tenant}'s "
                         f"test users for {NIGHTLY_WORKFLOW.as_posix()}")
    envs = password_envs(users, tenant)
    text = with_password_env(workflow, envs)
    if text is not None:
        out[workflow] = text
        notes.append(f"create the repository secrets {', '.join(envs)} (the test users' passwords) for the "
                     "nightly EKS job")
    return out, notes
