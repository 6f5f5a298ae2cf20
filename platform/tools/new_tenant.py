#!/usr/bin/env python3
"""Add a tenant: its folder, and its entry in every overlay and in GitOps.

    python platform/tools/new_tenant.py NAME [--platform-dir DIR]
                                        [--user-pool-id ID] [--client-id ID]

Writes platform/tenants/NAME/ from platform/tenants/_template/, then adds the tenant to
the `resources` of every platform/overlays/*/kustomization.yaml and writes its Flux
Kustomization (platform/gitops/tenants/NAME.yaml from _template.yaml there, listed in
that folder's kustomization.yaml). For the conformance suite it adds the suite's
RoleBindings in namespace NAME (platform/suite-rbac) and the password variables of NAME's
test users to the nightly EKS workflow (.github/workflows/nightly-eks.yml beside the
platform folder, names from fixtures/eks/users.yaml; see suite_wiring.py). Files are
edited as text, so comments and layout stay; an entry that is already there is left alone.

Without --user-pool-id/--client-id, ids in Cognito's formats are derived from the name
(the same name gives the same ids; they never repeat another tenant's). Pass the real
ids of the tenant's user pool and app client for a cluster that uses real Cognito.

Exit status: 0 when the tenant was added, 2 when NAME or an id is invalid, 1 when the
tenant already exists or a file to edit has an unexpected shape; nothing is written then.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import posixpath
import re
import shutil
import string
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import yaml

import check_catalog
import suite_wiring

PLATFORM_DIR = Path(__file__).resolve().parents[1]
TEMPLATE = "_template"
#: Every tenant host is <name>.<DOMAIN>: the gateway's wildcard certificate and the reverse
#: proxy's host pattern (platform/mesh) cover exactly this domain.
DOMAIN = "example.com"
DEFAULT_REGION = "us-east-1"

# The name is a namespace, a DNS label of the host, and the prefix of the Cognito domain
# "<name>-auth" (at most 63 characters, without "aws", "amazon" or "cognito").
DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
MAX_NAME = 63 - len("-auth")
COGNITO_DOMAIN_FORBIDDEN = ("aws", "amazon", "cognito")
# Namespaces the platform's dependencies own; mesh namespaces are read from platform/mesh.
RESERVED_NAMESPACES = {
    "default",
    "kube-system",
    "kube-public",
    "kube-node-lease",
    "istio-system",
    "istio-ingress",
    "cert-manager",
    "flux-system",
    "flagger-system",
}

USER_POOL_ID = re.compile(r"(?P<region>[a-z]{2}(-[a-z]+)+-[0-9]+)_[0-9A-Za-z]+")
CLIENT_ID = re.compile(r"[\w+]{1,128}")
ALNUM_MIXED = string.digits + string.ascii_letters
ALNUM_LOWER = string.digits + string.ascii_lowercase


class Refused(Exception):
    """The request cannot be carried out; `status` is the exit status."""

    def __init__(self, message: str, status: int = 1) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Tenant:
    name: str
    region: str
    user_pool_id: str
    client_id: str

    @property
    def host(self) -> str:
        return f"{self.name}.{DOMAIN}"

    def values(self) -> dict[str, str]:
        """What the templates' ${...} placeholders stand for."""
        return {
            "name": self.name,
            "host": self.host,
            "region": self.region,
            "user_pool_id": self.user_pool_id,
            "client_id": self.client_id,
        }


# --- checks ---------------------------------------------------------------------------


def check_name(name: str, platform_dir: Path) -> None:
    if not DNS_LABEL.fullmatch(name) or len(name) > MAX_NAME:
        raise Refused(
            f"{name!r} is not a valid tenant name: it must be a DNS label of at most {MAX_NAME} "
            "characters (lowercase letters, digits and '-', starting and ending with a letter "
            f"or digit), because it names the tenant's namespace, its host {name}.{DOMAIN} "
            f"and its Cognito domain {name}-auth",
            status=2,
        )
    if name in reserved_namespaces(platform_dir) or name.startswith("kube-"):
        raise Refused(f"{name!r} is not a valid tenant name: namespace {name} belongs to the platform", status=2)
    for word in COGNITO_DOMAIN_FORBIDDEN:
        if word in name:
            raise Refused(
                f"{name!r} is not a valid tenant name: Cognito refuses the domain prefix "
                f"{name}-auth because it contains {word!r}",
                status=2,
            )


def reserved_namespaces(platform_dir: Path) -> set[str]:
    names = set(RESERVED_NAMESPACES)
    for path in sorted((platform_dir / "mesh").rglob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if isinstance(doc, dict) and doc.get("kind") == "Namespace":
                names.add(str((doc.get("metadata") or {}).get("name")))
    return names


def existing_tenants(platform_dir: Path) -> dict[str, dict[str, str]]:
    """tenant folder -> its tenant.yaml data, for every tenant folder."""
    out = {}
    for folder in check_catalog.tenant_folders(platform_dir):
        data: dict[str, str] = {}
        path = platform_dir / "tenants" / folder / "tenant.yaml"
        if path.is_file():
            for doc in yaml.safe_load_all(path.read_text()):
                if isinstance(doc, dict) and doc.get("kind") == "ConfigMap":
                    data = {k: str(v) for k, v in (doc.get("data") or {}).items()}
        out[folder] = data
    return out


def _derived(alphabet: str, length: int, *seed: str) -> str:
    number = int.from_bytes(hashlib.sha256("\0".join(seed).encode()).digest(), "big")
    chars = []
    for _ in range(length):
        number, digit = divmod(number, len(alphabet))
        chars.append(alphabet[digit])
    return "".join(chars)


def choose_ids(name: str, user_pool_id: str | None, client_id: str | None, others: dict[str, dict[str, str]]) -> Tenant:
    used_pools = {d.get("userPoolId"): t for t, d in others.items()}
    used_clients = {d.get("clientId"): t for t, d in others.items()}
    if user_pool_id is not None:
        match = USER_POOL_ID.fullmatch(user_pool_id)
        if not match:
            raise Refused(
                f"--user-pool-id {user_pool_id!r} is not a Cognito user pool id (<region>_<id>, "
                "e.g. us-east-1_Ab3De6Gh9)",
                status=2,
            )
        region = match["region"]
    else:
        region = DEFAULT_REGION
        attempt = 0
        while True:
            user_pool_id = f"{region}_{_derived(ALNUM_MIXED, 9, 'user-pool', region, name, str(attempt))}"
            if user_pool_id not in used_pools:
                break
            attempt += 1
    if client_id is not None:
        if not CLIENT_ID.fullmatch(client_id):
            raise Refused(f"--client-id {client_id!r} is not a Cognito app client id ([A-Za-z0-9_+]+)", status=2)
    else:
        attempt = 0
        while True:
            client_id = _derived(ALNUM_LOWER, 26, "app-client", user_pool_id, name, str(attempt))
            if client_id not in used_clients:
                break
            attempt += 1
    if user_pool_id in used_pools:
        raise Refused(f"user pool {user_pool_id} is already tenant {used_pools[user_pool_id]}'s", status=2)
    if client_id in used_clients:
        raise Refused(f"app client {client_id} is already tenant {used_clients[client_id]}'s", status=2)
    return Tenant(name=name, region=region, user_pool_id=user_pool_id, client_id=client_id)


# --- editing lists of resources ---------------------------------------------------------

_ITEM = re.compile(r"^(?P<indent>[ ]*)-[ ]+(?P<value>[^#\s]+)[ ]*(#.*)?$")
_RESOURCES_KEY = re.compile(r"^resources:[ ]*(#.*)?$")


def with_resource(path: Path, entry: str) -> str | None:
    """The text of kustomization `path` with `entry` added to its top-level `resources`
    list (among the entries of the same folder, in order if they are sorted), or None
    when it is already there. Only a line is inserted; everything else is kept."""
    text = path.read_text()
    data = yaml.safe_load(text) or {}
    resources = data.get("resources")
    if not isinstance(resources, list):
        raise Refused(f"{path}: no `resources` list to add {entry} to")
    if any(_same_entry(r, entry) for r in resources):
        return None
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if _RESOURCES_KEY.match(line.rstrip("\n"))), None)
    if start is None:
        raise Refused(f"{path}: `resources` is not a block list (`resources:` on a line of its own); add {entry} by hand")
    items: list[tuple[int, str]] = []  # (line index, value)
    indent = None
    for i in range(start + 1, len(lines)):
        line = lines[i].rstrip("\n")
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        match = _ITEM.match(line)
        if match and (indent is None or match["indent"] == indent):
            indent = match["indent"]
            items.append((i, match["value"].strip("'\"")))
        elif line[0] not in " -":
            break
    if not items or indent is None:
        raise Refused(f"{path}: could not find the entries of `resources`; add {entry} by hand")
    folder = posixpath.dirname(posixpath.normpath(entry))
    peers = [(i, v) for i, v in items if posixpath.dirname(posixpath.normpath(v)) == folder]
    if peers and [v for _, v in peers] == sorted(v for _, v in peers):
        later = [i for i, v in peers if v > entry]
        position = later[0] if later else peers[-1][0] + 1
    else:
        position = (peers or items)[-1][0] + 1
    if position > 0 and not lines[position - 1].endswith("\n"):
        lines[position - 1] += "\n"
    lines.insert(position, f"{indent}- {entry}\n")
    new_text = "".join(lines)
    after = (yaml.safe_load(new_text) or {}).get("resources")
    if not isinstance(after, list) or sorted(map(str, after)) != sorted(map(str, resources + [entry])):
        raise Refused(f"{path}: adding {entry} as text did not give the expected list; add it by hand")
    return new_text


def _same_entry(a: object, b: str) -> bool:
    return isinstance(a, str) and posixpath.normpath(a.rstrip("/")) == posixpath.normpath(b.rstrip("/"))


# --- the whole change ---------------------------------------------------------------------


def render_template(path: Path, tenant: Tenant) -> str:
    try:
        return string.Template(path.read_text()).substitute(tenant.values())
    except (KeyError, ValueError) as exc:
        raise Refused(f"{path}: unknown or malformed placeholder {exc}") from exc


def plan(platform_dir: Path, tenant: Tenant, notes: list[str] | None = None) -> tuple[dict[Path, str], dict[Path, str]]:
    """(tenant folder files relative to it, other files to write) as path -> text;
    what the person running it must still do is appended to ``notes``."""
    template_dir = platform_dir / "tenants" / TEMPLATE
    if not template_dir.is_dir():
        raise Refused(f"no tenant template at {template_dir}")
    folder = {
        p.relative_to(template_dir): render_template(p, tenant)
        for p in sorted(template_dir.rglob("*"))
        if p.is_file()
    }
    others: dict[Path, str] = {}
    tenant_dir = platform_dir / "tenants" / tenant.name
    for overlay in check_catalog.overlays(platform_dir):
        entry = Path(os.path.relpath(tenant_dir, overlay)).as_posix()
        text = with_resource(overlay / check_catalog.KUSTOMIZATION, entry)
        if text is not None:
            others[overlay / check_catalog.KUSTOMIZATION] = text
    gitops_dir = platform_dir / "gitops" / "tenants"
    gitops_template = gitops_dir / f"{TEMPLATE}.yaml"
    if not gitops_template.is_file():
        raise Refused(f"no Flux Kustomization template at {gitops_template}")
    gitops_file = gitops_dir / f"{tenant.name}.yaml"
    if not gitops_file.exists():
        others[gitops_file] = render_template(gitops_template, tenant)
    text = with_resource(gitops_dir / check_catalog.KUSTOMIZATION, gitops_file.name)
    if text is not None:
        others[gitops_dir / check_catalog.KUSTOMIZATION] = text
    try:
        suite_files, suite_notes = suite_wiring.edits(platform_dir, tenant.name)
    except suite_wiring.ShapeError as exc:
        raise Refused(str(exc)) from None
    others.update(suite_files)
    if notes is not None:
        notes.extend(suite_notes)
    return folder, others


def add_tenant(platform_dir: Path, name: str, user_pool_id: str | None, client_id: str | None,
               notes: list[str] | None = None) -> tuple[Tenant, list[Path]]:
    """Write the tenant; returns it and the paths written (``notes`` gets what is left to
    do by hand). Refuses before writing anything."""
    if not (platform_dir / "tenants").is_dir():
        raise Refused(f"{platform_dir} is not a platform folder (no tenants/ in it)")
    check_name(name, platform_dir)
    tenant_dir = platform_dir / "tenants" / name
    if tenant_dir.exists():
        raise Refused(f"tenant {name!r} already exists ({tenant_dir}); remove that folder to create it again")
    others = existing_tenants(platform_dir)
    for folder, data in others.items():
        if data.get("name") == name or data.get("host") == f"{name}.{DOMAIN}":
            raise Refused(f"tenant {name!r} already exists as tenants/{folder}")
    tenant = choose_ids(name, user_pool_id, client_id, others)
    folder_files, other_files = plan(platform_dir, tenant, notes)

    # The tenant folder appears whole or not at all.
    staging = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=tenant_dir.parent))
    try:
        for rel, text in folder_files.items():
            (staging / rel).parent.mkdir(parents=True, exist_ok=True)
            (staging / rel).write_text(text)
        staging.rename(tenant_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    written = [tenant_dir]
    for path, text in other_files.items():
        path.write_text(text)
        written.append(path)
    return tenant, written


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="new_tenant.py", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("name", metavar="NAME", help="tenant name: namespace and host label")
    parser.add_argument("--platform-dir", type=Path, default=PLATFORM_DIR, help="the platform/ folder to edit")
    parser.add_argument("--user-pool-id", help="the tenant's Cognito user pool id (<region>_<id>)")
    parser.add_argument("--client-id", help="the tenant's Cognito app client id")
    args = parser.parse_args(argv)
    platform_dir = args.platform_dir.resolve()
    notes: list[str] = []
    try:
        tenant, written = add_tenant(platform_dir, args.name, args.user_pool_id, args.client_id, notes)
    except Refused as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return exc.status
    print(f"tenant {tenant.name}: host {tenant.host}, user pool {tenant.user_pool_id}, app client {tenant.client_id}")
    for path in written:
        # relative to the repository: the nightly workflow lies beside the platform folder
        print(f"  wrote {path.relative_to(platform_dir.parent).as_posix()}")
    for note in notes:
        print(f"  to do: {note}")
    remaining = check_catalog.problems(platform_dir)
    for line in remaining:
        print(f"{parser.prog}: warning: {line}", file=sys.stderr)
    return 1 if any(f"tenants/{tenant.name} " in f"{line} " for line in remaining) else 0


if __name__ == "__main__":
    sys.exit(main())
