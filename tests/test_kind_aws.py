"""kind's AWS for rag-api (fixtures/kind/aws.py), as far as this machine can run it.

The emulator pod's two commands run here on loopback exactly as its manifest says (only
the bind address and ports differ), the kind backend's provisioning command fills them,
and rag-api then starts with the environment the kind overlay renders for its pod
(configMap references resolved, the emulators' cluster addresses swapped for loopback):
it must become ready and answer a question from its own tenant's documents. What is left
for a machine with Docker is the image build and the cluster's DNS and routing.
"""

from __future__ import annotations

import base64
import json
import os
import re
import subprocess
import sys
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any, Iterator

import pytest

from fixtures.cluster import versions
from fixtures.kind import aws
from fixtures.manifests import render
from fixtures.process import Managed, Supervisor, free_port

REPO = Path(__file__).resolve().parents[1]
PLATFORM = REPO / "platform"
BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def kind_docs() -> list[dict[str, Any]]:
    return render(PLATFORM, "kind")


@pytest.fixture(scope="module")
def tenants(kind_docs):
    from fixtures.manifests import tenant_catalog
    from fixtures.platform import Tenant

    return [Tenant.from_config(d) for d in tenant_catalog(kind_docs)]


def rag_api_deployments(docs) -> list[dict[str, Any]]:
    found = [d for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "rag-api"]
    assert found, "the kind overlay renders no rag-api Deployment"
    return found


def pod_env(docs, deployment: dict[str, Any]) -> dict[str, str]:
    """The container's environment as the kubelet would set it (configMapKeyRef resolved)."""
    ns = deployment["metadata"]["namespace"]
    maps = {d["metadata"]["name"]: d.get("data", {}) for d in docs
            if d["kind"] == "ConfigMap" and d["metadata"].get("namespace") == ns}
    env = {}
    for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]:
        if "value" in e:
            env[e["name"]] = e["value"]
        else:
            ref = e["valueFrom"]["configMapKeyRef"]
            env[e["name"]] = maps[ref["name"]][ref["key"]]
    return env


def test_the_overlay_points_every_rag_api_at_the_emulators(kind_docs):
    for deployment in rag_api_deployments(kind_docs):
        env = pod_env(kind_docs, deployment)
        for name, url in aws.endpoints().items():
            assert env.get(name) == url, (deployment["metadata"]["namespace"], name)
        for name, value in aws.DUMMY_CREDENTIALS.items():
            assert env.get(name) == value


def test_the_other_overlays_leave_boto3_to_find_aws_itself():
    for overlay in ("eks", "standalone"):
        for deployment in rag_api_deployments(render(PLATFORM, overlay)):
            names = {e["name"] for e in deployment["spec"]["template"]["spec"]["containers"][0]["env"]}
            assert not names & {*aws.endpoints(), *aws.DUMMY_CREDENTIALS}, overlay


def test_the_services_reach_the_containers_that_serve_them(tenants):
    docs = aws.docs(tenants)
    (deployment,) = [d for d in docs if d["kind"] == "Deployment"]
    pod = deployment["spec"]["template"]
    assert pod["metadata"]["labels"]["sidecar.istio.io/inject"] == "false"
    assert [d for d in docs if d["kind"] == "Namespace"][0]["metadata"]["labels"]["istio-injection"] == "disabled"
    ports = {p["containerPort"] for c in pod["spec"]["containers"] for p in c["ports"]}
    urls = {urllib.parse.urlsplit(u) for u in aws.endpoints().values()}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    for url in urls:
        name, namespace = url.hostname.split(".")[:2]
        assert namespace == aws.NAMESPACE
        svc = services[name]
        assert svc["spec"]["selector"].items() <= pod["metadata"]["labels"].items()
        (port,) = [p for p in svc["spec"]["ports"] if p["port"] == url.port]
        assert port["targetPort"] in ports
    for c in pod["spec"]["containers"]:
        assert c["image"] == aws.IMAGE and c["imagePullPolicy"] == "IfNotPresent"  # kind-loaded, never pulled


def test_bedrock_serves_every_model_a_tenant_lists(tenants):
    (deployment,) = [d for d in aws.docs(tenants) if d["kind"] == "Deployment"]
    (bedrock,) = [c for c in deployment["spec"]["template"]["spec"]["containers"] if c["name"] == "bedrock"]
    served = set(bedrock["command"][bedrock["command"].index("--models") + 1].split(","))
    assert served == {m for t in tenants for m in t.listed("llmModels")}


def test_the_image_is_built_from_pinned_versions():
    text = aws.DOCKERFILE.read_text()
    assert {"PYTHON_IMAGE", "MOTO_VERSION"} <= set(re.findall(r"^ARG (\w+)", text, re.M))
    assert re.search(rf"^ARG PYTHON_IMAGE={re.escape(versions.PYTHON_IMAGE)}$", text, re.M)  # no drifting default
    for source in re.findall(r"^COPY (\S+) ", text, re.M):
        assert (aws.BUILD_CONTEXT / source).is_file(), source
    assert dict(aws.image().build_args) == {"PYTHON_IMAGE": versions.PYTHON_IMAGE, "MOTO_VERSION": versions.MOTO}
    # the apps are built on the same base
    for app in ("rag_api", "app_ui"):
        assert f"FROM {versions.PYTHON_IMAGE}" in (PLATFORM / "apps" / app / "Dockerfile").read_text()


def _ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as resp:  # noqa: S310 - loopback
        return resp.status == 200


def _on_loopback(command: list[str], port: int) -> list[str]:
    """The pod's command, bound to loopback on ``port`` and run from this checkout."""
    argv = [a for a in command]
    argv[argv.index("--host") + 1] = "127.0.0.1"
    argv[argv.index("--port") + 1] = str(port)
    if argv[0] == "moto_server":
        return [str(BIN / "moto_server"), *argv[1:]]
    assert argv[:2] == ["python", "/app/bedrock.py"], argv
    return [sys.executable, str(aws.BUILD_CONTEXT / "bedrock.py"), *argv[2:]]


@pytest.fixture(scope="module")
def emulators(tenants, tmp_path_factory) -> Iterator[dict[str, int]]:
    logs = tmp_path_factory.mktemp("kind-aws")
    (deployment,) = [d for d in aws.docs(tenants) if d["kind"] == "Deployment"]
    ports = {"moto": free_port(), "bedrock": free_port()}
    supervisor = Supervisor()
    try:
        for c in deployment["spec"]["template"]["spec"]["containers"]:
            port = ports[c["name"]]
            probe = c["readinessProbe"]["httpGet"]["path"]
            supervisor.start(Managed(c["name"], _on_loopback(c["command"], port), logs / f"{c['name']}.log",
                                     health=lambda port=port, probe=probe: _ok(f"http://127.0.0.1:{port}{probe}")),
                             timeout=60)
        yield {**ports, "logs": logs}
    finally:
        supervisor.close()


@pytest.fixture(scope="module")
def provisioned(emulators, tenants) -> list[str]:
    """The kind backend's provisioning command, as its plan shows it."""
    endpoint = f"http://127.0.0.1:{emulators['moto']}"
    argv = [sys.executable, "-m", "fixtures.kind.aws", "--endpoint", endpoint, "--platform-dir", str(PLATFORM),
            "--tenants", ",".join(t.name for t in tenants), "--log", str(emulators["logs"] / "ingest.log")]
    done = subprocess.run(argv, capture_output=True, text=True, timeout=aws.PROVISION_TIMEOUT_S,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.split()


def test_provisioning_writes_one_index_per_tenant_and_model(provisioned, tenants):
    expected = {f"s3://{t.data['documentsBucket']}/{t.data['documentsPrefix']}index/{m}/"
                for t in tenants for m in t.listed("embeddingModels")}
    assert set(provisioned) == expected


def test_provisioning_again_keeps_what_is_there(provisioned, emulators, tenants):
    """A kept cluster is reused: its emulator already has the tables."""
    from fixtures import aws as fixtures_aws

    for t in tenants:
        fixtures_aws.provision_storage(t, f"http://127.0.0.1:{emulators['moto']}")


def test_an_unknown_tenant_is_refused_by_name(emulators):
    done = subprocess.run([sys.executable, "-m", "fixtures.kind.aws", "--endpoint", "http://127.0.0.1:9",
                           "--platform-dir", str(PLATFORM), "--tenants", "tenanta,nosuch", "--log", os.devnull],
                          capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO)},
                          check=False)
    assert done.returncode == 2 and "nosuch" in done.stderr


def _loopback(url: str, emulators) -> str:
    port = emulators["bedrock"] if f":{aws.BEDROCK_PORT}" in url and aws.BEDROCK_SERVICE in url else emulators["moto"]
    return f"http://127.0.0.1:{port}"


def test_rag_api_with_its_kind_environment_answers_from_its_own_documents(provisioned, emulators, kind_docs,
                                                                            tmp_path):
    deployment = next(d for d in rag_api_deployments(kind_docs) if d["metadata"]["namespace"] == "tenanta")
    env = pod_env(kind_docs, deployment)
    for name in aws.endpoints():
        env[name] = _loopback(env[name], emulators)
    port = free_port()
    apps = PLATFORM / "apps"
    argv = [sys.executable, "-m", "uvicorn", "rag_api.app:app", "--app-dir", str(apps), "--host", "127.0.0.1",
            "--port", str(port), "--no-access-log"]
    keep = {k: v for k, v in os.environ.items() if k in ("PATH", "HOME", "LANG", "TMPDIR")}
    supervisor = Supervisor()
    try:
        supervisor.start(Managed("rag-api", argv, tmp_path / "rag-api.log", env={**keep, **env},
                                 health=lambda: _ok(f"http://127.0.0.1:{port}/readyz")), timeout=120)
        claims = {"iss": "https://idp.example.com/tenanta", "token_use": "id", "sub": "alice-sub",
                  "custom:tenantid": "tenanta"}
        payload = base64.urlsafe_b64encode(json.dumps(claims).encode()).decode().rstrip("=")
        question = "How are dangerous goods shipped?"
        req = urllib.request.Request(
            f"http://127.0.0.1:{port}/rag", method="POST",
            data=json.dumps({"question": question, "session_id": "kind-aws-1"}).encode(),
            headers={"content-type": "application/json", "x-jwt-payload": payload,
                     "x-auth-request-tenantid": "tenanta"})
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - loopback
            answer = json.loads(resp.read())
    finally:
        supervisor.close()
    own = {p.name for p in (PLATFORM / "tenants" / "tenanta" / "corpus").iterdir()}
    assert answer["sources"], answer
    assert {s["document"] for s in answer["sources"]} <= own, answer["sources"]
    with urllib.request.urlopen(f"http://127.0.0.1:{emulators['bedrock']}/_calls", timeout=5) as resp:  # noqa: S310
        calls = json.loads(resp.read())
    assert calls and calls[-1]["status"] == 200, calls[-1:]
