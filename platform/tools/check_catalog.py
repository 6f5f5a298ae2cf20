#!/usr/bin/env python3
"""Report tenant folders that are not delivered everywhere.

Every folder platform/tenants/<name>/ (the _template folder excluded) must be listed,
directly or through a listed kustomization, by every overlay in platform/overlays/, and
must have a Flux Kustomization in platform/gitops whose spec.path is that folder. A tenant
missing from one overlay would silently never be tested on that backend, or never be
deployed. Also reported: entries that name a tenant folder that does not exist.

Every tenant folder must also have a corpus (corpus/*.md and corpus/questions.yaml whose
`markers` list holds exactly one marker of each document), and a tenant's markers must be
its own: listed by no other tenant and found in no file of another tenant's corpus. The
markers are how the RAG suites see an answer built from the wrong tenant's documents.

    python platform/tools/check_catalog.py [--platform-dir DIR]

Exit status 0 when the catalog is complete, 1 with one line per problem otherwise.
Reads the kustomization and corpus files only (stdlib + PyYAML, no kubectl).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path, PurePosixPath

import yaml

PLATFORM_DIR = Path(__file__).resolve().parents[1]
KUSTOMIZATION = "kustomization.yaml"
FLUX_KUSTOMIZE_GROUP = "kustomize.toolkit.fluxcd.io/"
#: Where the GitRepository has this folder: Flux paths are ./platform/...
REPO_PLATFORM_PATH = PurePosixPath("platform")
CORPUS = "corpus"
QUESTIONS = "questions.yaml"


def tenant_folders(platform_dir: Path) -> list[str]:
    """Names of the tenant folders, without the template (or anything starting with _ or .)."""
    tenants = platform_dir / "tenants"
    return sorted(
        p.name
        for p in tenants.iterdir()
        if p.is_dir() and not p.name.startswith(("_", ".")) and (p / KUSTOMIZATION).is_file()
    )


def overlays(platform_dir: Path) -> list[Path]:
    """Every overlay folder: platform/overlays/<name>/ with a kustomization.yaml."""
    root = platform_dir / "overlays"
    return sorted(p for p in root.iterdir() if (p / KUSTOMIZATION).is_file())


def _load(path: Path) -> list[dict]:
    return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]


def _tenant_of(platform_dir: Path, path: Path) -> str | None:
    """`name` when `path` is platform/tenants/<name> (existing or not), else None."""
    try:
        rel = Path(os.path.normpath(path)).relative_to(Path(os.path.normpath(platform_dir)))
    except ValueError:
        return None
    parts = rel.parts
    if len(parts) == 2 and parts[0] == "tenants" and not parts[1].startswith(("_", ".")):
        return parts[1]
    return None


def listed_tenants(platform_dir: Path, kustomization_dir: Path) -> set[str]:
    """Tenants a kustomization includes as resources, following nested kustomizations."""
    found: set[str] = set()
    seen: set[Path] = set()

    def walk(directory: Path) -> None:
        directory = Path(os.path.normpath(directory))
        if directory in seen:
            return
        seen.add(directory)
        kfile = directory / KUSTOMIZATION
        if not kfile.is_file():
            return
        for doc in _load(kfile):
            for entry in doc.get("resources") or []:
                if not isinstance(entry, str) or "://" in entry or entry.startswith("github.com/"):
                    continue
                target = directory / entry
                tenant = _tenant_of(platform_dir, target)
                if tenant is not None:
                    found.add(tenant)
                elif (target / KUSTOMIZATION).is_file():
                    walk(target)

    walk(kustomization_dir)
    return found


def gitops_tenants(platform_dir: Path) -> set[str]:
    """Tenants that have a Flux Kustomization in platform/gitops (by its spec.path)."""
    found: set[str] = set()
    seen: set[Path] = set()

    def walk(directory: Path) -> None:
        directory = Path(os.path.normpath(directory))
        if directory in seen or not (directory / KUSTOMIZATION).is_file():
            return
        seen.add(directory)
        for doc in _load(directory / KUSTOMIZATION):
            for entry in doc.get("resources") or []:
                if not isinstance(entry, str):
                    continue
                target = directory / entry
                if target.is_dir():
                    walk(target)
                elif target.is_file():
                    for obj in _load(target):
                        tenant = _flux_tenant(platform_dir, obj)
                        if tenant is not None:
                            found.add(tenant)

    walk(platform_dir / "gitops")
    return found


def _flux_tenant(platform_dir: Path, obj: dict) -> str | None:
    if not str(obj.get("apiVersion", "")).startswith(FLUX_KUSTOMIZE_GROUP) or obj.get("kind") != "Kustomization":
        return None
    path = PurePosixPath(str((obj.get("spec") or {}).get("path", "")))
    parts = [p for p in path.parts if p not in (".", "")]
    if parts[:1] != list(REPO_PLATFORM_PATH.parts):
        return None
    return _tenant_of(platform_dir, platform_dir.joinpath(*parts[1:]))


def _corpus(platform_dir: Path, tenant: str, out: list[str]) -> tuple[dict[str, str], list[str]]:
    """(file name -> text of the tenant's corpus folder, its markers); problems go to `out`."""
    folder = platform_dir / "tenants" / tenant / CORPUS
    if not folder.is_dir():
        out.append(f"corpus: tenant folder tenants/{tenant} has no {CORPUS}/ folder")
        return {}, []
    files = {p.name: p.read_text(errors="replace") for p in sorted(folder.iterdir()) if p.is_file()}
    documents = [name for name in files if name.endswith(".md")]
    if not documents:
        out.append(f"corpus: tenants/{tenant} has no documents ({CORPUS}/*.md)")
    try:
        data = yaml.safe_load(files.get(QUESTIONS, ""))
    except yaml.YAMLError as exc:
        out.append(f"corpus: tenants/{tenant} {CORPUS}/{QUESTIONS} is not valid YAML: {exc}")
        return files, []
    markers = data.get("markers") if isinstance(data, dict) else None
    if not isinstance(markers, list) or not markers or not all(isinstance(m, str) and m for m in markers):
        out.append(f"corpus: tenants/{tenant} has no list of markers in {CORPUS}/{QUESTIONS}")
        return files, []
    for name in documents:
        held = [m for m in markers if m in files[name]]
        if len(held) != 1:
            out.append(f"corpus: tenants/{tenant} {CORPUS}/{name} holds {len(held)} markers, not exactly one")
    for marker in markers:
        if not any(marker in files[name] for name in documents):
            out.append(f"corpus: tenants/{tenant} marker {marker} is in none of its documents")
    return files, markers


def corpus_problems(platform_dir: Path) -> list[str]:
    """One sentence per tenant without a well-formed corpus, and per marker that is not its
    tenant's alone (listed by another tenant, or found in another tenant's corpus)."""
    out: list[str] = []
    corpora = {t: _corpus(platform_dir, t, out) for t in tenant_folders(platform_dir)}
    owners: dict[str, list[str]] = {}
    for tenant, (_, markers) in corpora.items():
        for marker in markers:
            owners.setdefault(marker, []).append(tenant)
    for marker, tenants in sorted(owners.items()):
        if len(tenants) > 1:
            out.append(f"corpus: marker {marker} is listed by " + " and ".join(f"tenants/{t}" for t in tenants))
    for tenant, (_, markers) in corpora.items():
        for other, (files, _) in corpora.items():
            if other == tenant:
                continue
            for name, text in files.items():
                for marker in markers:
                    if marker in text:
                        out.append(f"corpus: marker {marker} of tenants/{tenant} appears in tenants/{other} {CORPUS}/{name}")
    return out


def problems(platform_dir: Path) -> list[str]:
    """One sentence per tenant folder missing from an overlay or from GitOps, per entry
    naming a tenant folder that does not exist, and per corpus problem (corpus_problems)."""
    platform_dir = Path(platform_dir)
    folders = set(tenant_folders(platform_dir))
    out: list[str] = []
    places = [(f"overlay {o.name}", o / KUSTOMIZATION, listed_tenants(platform_dir, o)) for o in overlays(platform_dir)]
    places.append(("gitops", platform_dir / "gitops", gitops_tenants(platform_dir)))
    for label, where, listed in places:
        shown = where.relative_to(platform_dir).as_posix()
        for tenant in sorted(folders - listed):
            out.append(f"{label}: tenant folder tenants/{tenant} is not listed in {shown}")
        for tenant in sorted(listed - folders):
            out.append(f"{label}: {shown} lists tenants/{tenant}, which is not a tenant folder")
    return out + corpus_problems(platform_dir)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--platform-dir", type=Path, default=PLATFORM_DIR, help="the platform/ folder to check")
    args = parser.parse_args(argv)
    found = problems(args.platform_dir)
    for line in found:
        print(line, file=sys.stderr)
    if not found:
        print(f"catalog complete: {len(tenant_folders(args.platform_dir))} tenants in every overlay and in gitops, "
              "each with a corpus of its own")
    return 1 if found else 0


if __name__ == "__main__":
    sys.exit(main())
