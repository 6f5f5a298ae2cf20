"""Finding the pinned tools, refusing wrong versions, and the one install step that
downloads (checked against the upstream checksums; nothing fetched here for real)."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile

import pytest

from fixtures.cluster import tools, versions
from fixtures.cluster.commands import CommandError, Executor
from fixtures.cluster.fakes import FakeTools


@pytest.fixture
def fakes(tmp_path):
    return FakeTools(tmp_path / "fakes")


def test_pinned_tools_dir_wins_over_path(fakes, tmp_path, monkeypatch):
    monkeypatch.delenv("KIND_BIN", raising=False)
    fakes.install("kind")  # a kind on "PATH"
    fakes.install("docker")
    pinned = fakes.install("kind", versions.kind_binary_path())
    found = tools.resolve(path=fakes.bin, root=fakes.root)
    assert found.kind == str(pinned)
    pinned.unlink()
    assert tools.resolve(path=fakes.bin, root=fakes.root).kind == f"{fakes.bin}/kind"
    monkeypatch.setenv("KIND_BIN", "/opt/kind")
    assert tools.resolve(path=fakes.bin, root=fakes.root).kind == "/opt/kind"


def test_a_missing_tool_fails_at_use_saying_how_to_install_it(tmp_path, monkeypatch):
    monkeypatch.delenv("KIND_BIN", raising=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    found = tools.resolve(path=str(empty), root=tmp_path)  # eks never runs kind: no error yet
    assert found.kind == str(tmp_path / versions.kind_binary_path())
    assert set(found.istioctl) == set(versions.ISTIO_RELEASES)
    with pytest.raises(CommandError, match="not found.*make cluster-tools"):
        tools.check_versions(found, Executor())


def test_wrong_versions_are_refused(fakes):
    kind = fakes.install("kind")
    istioctl = fakes.install("istioctl")
    fakes.on("kind", "version", stdout="kind v0.17.0 go1.19 linux/amd64\n")
    fakes.on("istioctl", "version", stdout='{"clientVersion": {"version": "1.27.0"}}')
    found = tools.Tools(kind=str(kind), kubectl="kubectl", docker="docker",
                        istioctl={versions.ISTIO: str(istioctl)}, root=fakes.root)
    with pytest.raises(tools.ToolError, match=f"the pinned kind is v{versions.KIND}"):
        tools.check_versions(found, Executor())
    fakes.rules.clear()
    fakes.on("kind", "version", stdout=f"kind v{versions.KIND} go1.24.6 linux/amd64\n")
    fakes.on("istioctl", "version", stdout='{"clientVersion": {"version": "1.27.0"}}')
    with pytest.raises(tools.ToolError, match=f"Istio {versions.ISTIO} was asked for"):
        tools.check_versions(found, Executor())
    with pytest.raises(tools.ToolError, match="pinned releases"):
        found.istioctl_for("1.31.0")


def test_no_docker_engine_is_a_clear_error(fakes):
    docker = fakes.install("docker")
    fakes.on("docker", "version", stderr="Cannot connect to the Docker daemon at unix:///var/run/docker.sock\n",
             exit=1)
    found = tools.Tools(kind="kind", kubectl="kubectl", docker=str(docker), istioctl={}, root=fakes.root)
    with pytest.raises(tools.ToolError, match="(?s)needs a running Docker engine.*Cannot connect"):
        tools.require_docker(found, Executor())


def _tar(members: dict[str, bytes]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def _published(tampered: str | None = None) -> dict[str, bytes]:
    """Every pinned download of a linux/amd64 machine, with its published checksum."""
    out = {}
    for art in versions.artifacts("linux", "amd64"):
        if art.extract == "istioctl":
            data = _tar({"istioctl": f"istioctl {art.version}".encode()})
        elif art.extract == "*":
            data = _tar({f"flagger-{art.version}/kustomize/istio/kustomization.yaml": b"namespace: istio-system\n"})
        else:
            data = f"{art.name} {art.version}".encode()
        out[art.url] = data
        if art.checksum_url:
            digest = hashlib.sha256(data).hexdigest()
            if art.name == tampered:
                digest = "0" * 64
            out[art.checksum_url] = f"{digest}  {art.url.rsplit('/', 1)[-1]}\n".encode()
    return out


def test_install_fetches_verifies_and_lays_out_every_pinned_tool(tmp_path, monkeypatch):
    monkeypatch.setattr(versions, "machine", lambda: ("linux", "amd64"))
    published = _published()
    fetched = []

    def fetch(url):
        fetched.append(url)
        return published[url]

    out = io.StringIO()
    tools.install(tmp_path, fetch=fetch, out=out)
    kind = tmp_path / versions.kind_binary_path()
    assert kind.read_bytes() == f"kind {versions.KIND}".encode() and os.access(kind, os.X_OK)
    for v in versions.ISTIO_RELEASES:
        binary = tmp_path / versions.istioctl_path(v)
        assert binary.read_bytes() == f"istioctl {v}".encode() and os.access(binary, os.X_OK)
    assert (tmp_path / versions.flagger_tree() / "kustomize" / "istio" / "kustomization.yaml").is_file()
    assert (tmp_path / versions.cert_manager_manifest()).is_file()
    assert "sha256" in out.getvalue()
    # a second run downloads nothing
    fetched.clear()
    tools.install(tmp_path, fetch=fetch, out=io.StringIO())
    assert fetched == []


def test_install_refuses_a_download_whose_checksum_differs(tmp_path, monkeypatch):
    monkeypatch.setattr(versions, "machine", lambda: ("linux", "amd64"))
    published = _published(tampered="kind")
    with pytest.raises(tools.ToolError, match="does not match the published"):
        tools.install(tmp_path, fetch=published.__getitem__, out=io.StringIO())
    assert not (tmp_path / versions.kind_binary_path()).exists()
