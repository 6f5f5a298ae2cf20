"""The kind backend driven for real against fake kind, kubectl, istioctl and docker:
the calls, their order and form, the waits, cleanup on success and failure, artifacts."""

from __future__ import annotations

import dataclasses
import json
import shutil
import subprocess
import types
from pathlib import Path

import pytest
import yaml

from fixtures.cluster import istio, versions
from fixtures.cluster.callers import ClusterGateway
from fixtures.cluster.commands import CommandError, Executor
from fixtures.cluster.fakes import healthy_cluster, kind_tools
from fixtures.cluster.kubectl import RUN_LABEL
from fixtures.cluster.tools import Tools
from fixtures.kind.backend import KindPlatform
from fixtures.kind import stack
from fixtures.manifests import kubectl as real_kubectl
from fixtures.manifests import overlay_dir
from fixtures.platform import MissingCapability, Outcome
from fixtures.proxy_protocol import V2_SIGNATURE
from fixtures.standalone.envoy_config import ACCESS_LOG_FORMAT

PLATFORM = Path(__file__).resolve().parents[1] / "platform"
ISTIO = versions.ISTIO


@pytest.fixture(scope="module")
def rendered() -> dict[str, str]:
    """The renders a run asks kubectl for, made once (the fake kubectl answers with them)."""
    directory = overlay_dir(PLATFORM, "kind")
    return {str(directory): subprocess.run([real_kubectl(), "kustomize", str(directory)], capture_output=True,
                                           text=True, check=True).stdout}


def new_env(root: Path, rendered: dict[str, str]):
    t = kind_tools(root / "tools", istio_versions=(ISTIO,), kind_version=versions.KIND)
    tools = Tools(kind=t["kind"], kubectl=t["kubectl"], docker=t["docker"], istioctl=t["istioctl"],
                  root=root / "tools")
    fakes = t["fakes"]
    for directory, text in rendered.items():
        fakes.on("kubectl", "kustomize", directory, stdout=text)
    tester = root / "tools" / versions.flagger_tree() / "kustomize" / "tester"
    fakes.on("kubectl", "kustomize", str(tester), stdout=LOADTESTER)
    return fakes, tools, root


@pytest.fixture
def env(tmp_path, rendered):
    return new_env(tmp_path, rendered)


def make(env, *, clusters: str = "", keep: bool = False, attach: bool = False, extra=(),
         real_processes: bool = False) -> KindPlatform:
    """A KindPlatform on the fakes: as real processes (one run of this module, to prove
    the tools are executed as argument lists), else answered in-process (fast)."""
    fakes, tools, tmp = env
    for rule in extra:  # specific rules first: the first match answers
        fakes.sequence(*rule[0], answers=rule[1])
    healthy_cluster(fakes, real_kubectl(), istio_versions=(ISTIO,), kind_version=versions.KIND, clusters=clusters)
    plat = KindPlatform(PLATFORM, cluster_name="t1", host_port=31443, keep=keep, attach=attach,
                        runner=Executor(tmp / "commands.log") if real_processes else fakes.runner(tmp / "commands.log"),
                        tools=tools, artifacts_dir=tmp / "artifacts",
                        run_id="run1")
    plat.kubectl.poll_interval = 0.01
    plat.cognito.start = lambda tenants: plat.runner.section("identity provider (stubbed)")
    # provisioning needs moto behind a port-forward: tests/test_kind_aws.py runs it for real
    plat.aws.provision = lambda tenants: plat.runner.section("AWS data (stubbed)")
    return plat


# What Flagger's kustomize/tester renders: no ServiceAccount of its own (it would run as `default`).
LOADTESTER = """apiVersion: v1
kind: Service
metadata:
  name: flagger-loadtester
  namespace: test
spec:
  ports:
  - name: http
    port: 80
    targetPort: 8080
  selector:
    app: flagger-loadtester
---
apiVersion: apps/v1
kind: Deployment
metadata:
  name: flagger-loadtester
  namespace: test
spec:
  selector:
    matchLabels:
      app: flagger-loadtester
  template:
    metadata:
      labels:
        app: flagger-loadtester
    spec:
      containers:
      - name: loadtester
        image: ghcr.io/fluxcd/flagger-loadtester:0.29.0
        ports:
        - name: http
          containerPort: 8080
"""
NOT_YET = {"stdout": json.dumps({"items": [{"metadata": {"name": "rag-api"}, "status": {"phase": "Progressing"}}]})}
INITIALIZED = {"stdout": json.dumps({"items": [{"metadata": {"name": "rag-api"}, "status": {"phase": "Initialized"}}]})}
APP_UI_POD = json.dumps({"items": [{"metadata": {"name": "app-ui-1"},
                                    "spec": {"containers": [{"name": "app-ui"}, {"name": "istio-proxy"}]},
                                    "status": {"phase": "Running",
                                               "containerStatuses": [{"name": "app-ui", "ready": True}]}}]})
# Envoy's local reply when the callee refused the caller's certificate (body base64)
TLS_REFUSED = json.dumps({"status": 503, "headers": [["content-type", "text/plain"]],
                          "body": "dXBzdHJlYW0gY29ubmVjdCBlcnJvcjsgdHJhbnNwb3J0IGZhaWx1cmUgcmVhc29uOiBUTFNfZXJyb3I6"
                                  "VExTVjFfQUxFUlRfVU5LTk9XTl9DQQ==", "elapsed": 0.01})
GATEWAY_DEPLOYMENT = json.dumps({"spec": {"template": {"metadata": {"annotations": {
    "proxy.istio.io/config": '{"gatewayTopology":{"numTrustedProxies":0,"proxyProtocol":{}}}'}}}}})
GATEWAY_POD = json.dumps({"items": [{"metadata": {"name": "gw-1", "labels": {"istio": "ingressgateway"}},
                                     "spec": {"containers": [{"name": "istio-proxy"}]},
                                     "status": {"phase": "Running",
                                                "conditions": [{"type": "Ready", "status": "True"}]}}]})
GATEWAY_STATS = ("listener.0.0.0.0_8443.downstream_cx_total: 5\n"
                 "http.outbound_0.0.0.0_8443.downstream_rq_total: 4\n"
                 "cluster.outbound|80||app-ui.tenanta.svc.cluster.local.upstream_rq_total: 3\n")
GATEWAY_LISTENERS = json.dumps({"configs": [{"active_state": {"listener": {"access_log": [{"typed_config": {
    "@type": "type.googleapis.com/envoy.extensions.access_loggers.file.v3.FileAccessLog", "path": "/dev/stdout",
    "log_format": {"json_format": ACCESS_LOG_FORMAT}}}]}}}]})
GATEWAY_LOG = ("2025-01-01T00:00:00.000000Z\tinfo\tEnvoy proxy is ready\n"
               + json.dumps({**{k: None for k in ACCESS_LOG_FORMAT}, "path": "/api/whoami", "response_code": 200})
               + "\n")


@pytest.fixture(scope="module")
def run(tmp_path_factory, rendered):
    """One healthy run, start to close, with a call, a fault and a dump in between."""
    env = new_env(tmp_path_factory.mktemp("kind-run"), rendered)
    fakes, _, tmp = env
    plat = make(env, extra=[(("kubectl", "get", "canaries", "tenanta"), [NOT_YET, NOT_YET, INITIALIZED]),
                            (("kubectl", "get", "pods", "tenanta"), [{"stdout": APP_UI_POD}]),
                            (("kubectl", "get", "pods", "istio=ingressgateway"), [{"stdout": GATEWAY_POD}]),
                            (("kubectl", "exec", "gw-1", "stats"), [{"stdout": GATEWAY_STATS}]),
                            (("kubectl", "exec", "gw-1", "config_dump?resource=dynamic_listeners"),
                             [{"stdout": GATEWAY_LISTENERS}]),
                            (("kubectl", "logs", "gw-1"), [{"stdout": GATEWAY_LOG}]),
                            (("kubectl", "exec"), [{"stdout": TLS_REFUSED + "\n"}]),
                            (("kubectl", "get", "deployment", "istio-ingressgateway"), [{"stdout": GATEWAY_DEPLOYMENT}])],
                real_processes=True)
    config = {}
    original = Executor._execute

    def spy(self, cmd):  # the kind config file exists only during the run
        if cmd.argv[1:3] == ("create", "cluster"):
            config["text"] = Path(cmd.argv[cmd.argv.index("--config") + 1]).read_text()
        return original(self, cmd)

    Executor._execute = spy
    try:
        plat.start()
    finally:
        Executor._execute = original
    r = types.SimpleNamespace(plat=plat, fakes=fakes, config=config["text"], gateway=plat.gateway(),
                              ca=plat.gateway().ca_bundle.read_bytes(), run_dir=plat.run_dir)
    try:
        r.call = plat.workload("tenanta", "app-ui").call("rag-api.tenantb.svc.cluster.local:8080", "/whoami",
                                                        headers={"authorization": "Bearer tok-123456"})
        with plat.fault("gateway-proxy-protocol-removed") as fault:
            r.fault = fault
        # the gateway's Envoy through its pod (the backend hands the gateway its kubectl)
        gw = dataclasses.replace(plat.gateway(), kubectl=plat.kubectl)
        r.stats, r.access_log = gw.stats(), gw.access_log()
        with pytest.raises(MissingCapability, match="standalone-only"):
            plat.fault("gateway-proxy-protocol-twice")
        plat.dump(tmp / "dump")
        r.dump = tmp / "dump"
        r.before_close = len(fakes.calls())
    finally:
        plat.close()
    return r


def test_start_drives_the_tools_in_order(run):
    fakes = run.fakes
    kind = fakes.argvs("kind")
    assert kind[0] == ["version"] and kind[1] == ["get", "clusters"]
    assert kind[2][:6] == ["create", "cluster", "--name", "t1", "--image", versions.KIND_NODE_IMAGE]
    assert [k[:2] for k in kind[3:6]] == [["load", "docker-image"]] * 3  # two apps, the AWS emulators
    docker = fakes.argvs("docker")
    assert docker[0][0] == "version" and docker[1][:2] == ["buildx", "version"]
    assert [d[0] for d in docker[2:]] == ["build", "build", "build"]
    # no attestation manifests: `kind load` of them fails with Docker's containerd image store
    assert all(d[1:3] == ["--provenance=false", "--sbom=false"] for d in docker[2:])
    istioctl = [a for a in fakes.argvs(f"istioctl-{ISTIO}") if "proxy-config" not in a]
    assert [a[:2] for a in istioctl] == [["version", "--remote=false"], ["install", "-y"], ["tag", "set"]]
    assert f"revision={versions.istio_revision(ISTIO)}" in istioctl[1]
    kubectl = fakes.argvs("kubectl")
    assert all(a[:2] == ["--context", "kind-t1"] for a in kubectl if a[0] != "kustomize")
    applied = [c["stdin"] for c in fakes.calls("kubectl") if "apply" in c["argv"] and "-" in c["argv"]]
    assert any("kind: Canary" in s for s in applied) and any(f"{RUN_LABEL}: run1" in s for s in applied)


def test_the_aws_emulators_are_applied_and_waited_for_before_the_platform(run):
    calls = run.fakes.calls("kubectl")
    emulators = next(i for i, c in enumerate(calls) if c.get("stdin") and "name: aws-emulators" in c["stdin"])
    waited = next(i for i, c in enumerate(calls) if "deployments" in c["argv"] and "aws-emulators" in c["argv"])
    platform = next(i for i, c in enumerate(calls) if c.get("stdin") and "kind: Canary" in c["stdin"])
    assert emulators < waited < platform


def applies(fakes) -> list[list[dict]]:
    """The documents of each ``kubectl apply -f -``, in order."""
    return [[d for d in yaml.safe_load_all(c["stdin"]) if d] for c in fakes.calls("kubectl")
            if "apply" in c["argv"] and "-" in c["argv"]]


def kinds(docs: list[dict]) -> set[tuple[str, str]]:
    return {(d["kind"], d["metadata"]["name"]) for d in docs}


def test_the_load_tester_runs_as_its_own_service_account(run):
    (docs,) = [docs for docs in applies(run.fakes) if ("Deployment", "flagger-loadtester") in kinds(docs)]
    (deploy,) = [d for d in docs if d["kind"] == "Deployment"]
    assert deploy["metadata"]["namespace"] == stack.FLAGGER_NAMESPACE
    assert deploy["spec"]["template"]["spec"]["serviceAccountName"] == stack.LOADTESTER_SERVICE_ACCOUNT
    assert ("ServiceAccount", stack.LOADTESTER_SERVICE_ACCOUNT) in kinds(docs)


def test_a_load_tester_render_without_its_deployment_is_refused(env):
    fakes, _, root = env
    tester = root / "tools" / versions.flagger_tree() / "kustomize" / "tester"
    # ahead of new_env's answer for the same render: the first matching rule answers
    fakes.rules.insert(0, {"tool": "kubectl", "has": ["kustomize", str(tester)],
                           "answers": [{"stdout": LOADTESTER.split("---")[0]}]})
    plat = make(env)
    with pytest.raises(RuntimeError, match="renders 0 Deployments named flagger-loadtester"):
        plat.start()
    assert not [docs for docs in applies(fakes) if ("ServiceAccount", "flagger-loadtester") in kinds(docs)]


def test_the_kind_config_maps_the_gateway_port(run):
    assert "containerPort: 30443" in run.config and "hostPort: 31443" in run.config
    assert "listenAddress: 127.0.0.1" in run.config


def test_the_gateway_is_the_mapped_port_with_the_certificates_ca(run):
    assert run.gateway.address == ("127.0.0.1", 31443) and run.gateway.expects_proxy_protocol
    assert run.ca.startswith(b"-----BEGIN CERTIFICATE-----")


def test_waits_poll_until_ready_and_not_once_more(run):
    assert len([a for a in run.fakes.argvs("kubectl") if "canaries" in a and "tenanta" in a]) == 3


def test_close_removes_the_run_namespace_then_the_cluster(run):
    after = [c["argv"] for c in run.fakes.calls()[run.before_close:]]
    assert after[0][2:5] == ["delete", "namespace", "-l"] and f"{RUN_LABEL}=run1" in after[0]
    assert after[-1] == ["delete", "cluster", "--name", "t1"]
    assert not run.run_dir.exists()


def test_calls_from_a_pod_carry_the_request_on_stdin(run):
    exec_call = next(c for c in run.fakes.calls("kubectl") if "exec" in c["argv"])
    assert exec_call["argv"][2:9] == ["exec", "-i", "-n", "tenanta", "app-ui-1", "-c", "app-ui"]
    assert "tok-123456" not in " ".join(exec_call["argv"]) and "tok-123456" in exec_call["stdin"]
    assert run.call.outcome is Outcome.TLS_REFUSED
    assert "UNKNOWN_CA" in run.call.headers["x-mesh-upstream-failure"]


def test_faults_are_real_changes_undone_on_exit(run):
    patches = [json.loads(a[a.index("-p") + 1]) for a in run.fakes.argvs("kubectl") if "patch" in a]
    values = [p["spec"]["template"]["metadata"]["annotations"]["proxy.istio.io/config"] for p in patches]
    assert values == ['{"gatewayTopology":{"numTrustedProxies":0}}',
                      '{"gatewayTopology":{"numTrustedProxies":0,"proxyProtocol":{}}}']


def test_the_fault_yields_the_standalone_shape(run):
    assert run.fault.rejected == {} and run.fault.changed == ["istio-system/istio-ingressgateway"]


def test_istio_logs_json_access_and_keeps_the_gateway_counters(run):
    install = next(a for a in run.fakes.argvs(f"istioctl-{ISTIO}") if a[:1] == ["install"])
    values = [install[i + 1] for i, a in enumerate(install) if a == "--set"]
    assert all(v.count("=") == 1 for v in values), "istioctl splits a --set on '='"
    settings = dict(v.split("=") for v in values)
    assert settings["meshConfig.accessLogFile"] == "/dev/stdout"
    assert settings["meshConfig.accessLogEncoding"] == "JSON"
    assert json.loads(settings["meshConfig.accessLogFormat"]) == ACCESS_LOG_FORMAT
    prefixes = [v for k, v in settings.items() if k.startswith("meshConfig.defaultConfig.proxyStatsMatcher.")]
    assert prefixes == list(istio.STATS_PREFIXES)


def test_the_gateways_envoy_is_read_through_its_pod(run):
    assert run.stats["cluster.outbound|80||app-ui.tenanta.svc.cluster.local.upstream_rq_total"] == 3
    assert [(e["path"], e["response_code"]) for e in run.access_log] == [("/api/whoami", 200)]
    reads = [a[2:] for a in run.fakes.argvs("kubectl") if "gw-1" in a]
    assert reads == [["exec", "-n", "istio-system", "gw-1", "-c", "istio-proxy", "--", "pilot-agent", "request",
                      "GET", path] for path in ("stats", "config_dump?resource=dynamic_listeners")] + [
        ["logs", "-n", "istio-system", "gw-1", "-c", "istio-proxy"]]


def test_dump_has_logs_and_envoy_config_of_every_proxy(run):
    assert (run.dump / "tenanta.app-ui-1.app-ui.log").exists()
    assert (run.dump / "tenanta.app-ui-1.istio-proxy.log").exists()
    assert json.loads((run.dump / "tenanta.app-ui-1.proxy-config.json").read_text()) == {"configs": []}
    assert (run.dump / "istio-system.events.txt").exists()
    assert (run.dump / "commands.log").exists()


def test_an_existing_cluster_is_reused_and_kept(env):
    fakes, _, _ = env
    plat = make(env, clusters="other\nt1\n", keep=True)
    plat.start()
    plat.close()
    assert not [a for a in fakes.argvs("kind") if a[:2] in (["create", "cluster"], ["delete", "cluster"])]
    assert plat.run_dir.exists()
    shutil.rmtree(plat.run_dir)


def test_a_failed_setup_collects_artifacts_then_deletes_the_cluster(env):
    fakes, _, tmp = env
    pods = json.dumps({"items": [{"metadata": {"name": "istiod-x"},
                                  "spec": {"containers": [{"name": "discovery"}, {"name": "istio-proxy"}]},
                                  "status": {"containerStatuses": [{"name": "discovery", "restartCount": 2}]}}]})
    plat = make(env, extra=[((f"istioctl-{ISTIO}", "tag", "set"), [{"stderr": "Error: webhook not ready\n", "exit": 1}]),
                            (("kubectl", "get", "pods", "istio-system"), [{"stdout": pods}])])
    with pytest.raises(CommandError, match="webhook not ready") as err:
        plat.start()
    setup = tmp / "artifacts" / "setup"
    assert any("artifacts of the failed set-up" in n for n in err.value.__notes__)
    assert (setup / "istio-system.istiod-x.discovery.log").exists()
    assert (setup / "istio-system.istiod-x.discovery.previous.log").exists()
    assert (setup / "istio-system.istiod-x.proxy-config.json").exists()
    assert (setup / "commands.log").exists()
    proxy_config = [a for a in fakes.argvs(f"istioctl-{ISTIO}") if "proxy-config" in a]
    assert proxy_config == [["--context", "kind-t1", "proxy-config", "all", "istiod-x.istio-system", "-o", "json"]]
    assert fakes.argvs("kind")[-1] == ["delete", "cluster", "--name", "t1"]
    # the run namespace was never made, so nothing of it is deleted
    assert not [a for a in fakes.argvs("kubectl") if "namespace" in a and "delete" in a]
    assert not plat.run_dir.exists()


def test_a_failed_setup_with_keep_keeps_the_cluster(env):
    fakes, _, _ = env
    plat = make(env, keep=True, extra=[(("docker", "build"), [{"stderr": "no space left\n", "exit": 1}])])
    with pytest.raises(CommandError, match="no space left"):
        plat.start()
    assert not [a for a in fakes.argvs("kind") if a[:2] == ["delete", "cluster"]]
    shutil.rmtree(plat.run_dir)


def test_attach_uses_the_cluster_as_it_is(env):
    fakes, _, _ = env
    plat = make(env, attach=True)
    plat.start()
    plat.close()
    assert fakes.argvs("kind") == [] and fakes.argvs("docker") == []
    assert fakes.argvs(f"istioctl-{ISTIO}") == []
    applied = [c["stdin"] for c in fakes.calls("kubectl") if "apply" in c["argv"]]
    assert len(applied) == 1 and "kind: Pod" in applied[0]  # only the run namespace and its pod


def test_gateway_sends_the_proxy_header_unless_the_load_balancer_does(monkeypatch, tmp_path):
    sent = []
    monkeypatch.setattr("fixtures.cluster.callers.gateway_request",
                        lambda address, host, path, **kw: sent.append(kw["preamble"]))
    ClusterGateway(("127.0.0.1", 31443), tmp_path / "ca.pem", True).request("tenanta.example.com")
    ClusterGateway(("nlb", 443), tmp_path / "ca.pem", True, load_balancer_writes_proxy_header=True).request(
        "tenanta.example.com")
    assert sent[0].startswith(V2_SIGNATURE) and sent[1] is None


class _Config:
    """What the platform fixture hands a backend: pytest's options."""

    def __init__(self, **options):
        self.options = {"--platform-dir": str(PLATFORM), "--keep": False, "--artifacts": "artifacts",
                        "--kind-cluster": "tenant-mesh", "--cluster-attach": False, **options}

    def getoption(self, name):
        return self.options[name]


def test_the_pytest_options_reach_the_backend():
    plat = KindPlatform.from_pytest(_Config(**{"--kind-cluster": "ci", "--keep": True, "--cluster-attach": True}))
    try:
        assert (plat.cluster_name, plat.context, plat.keep, plat.attach) == ("ci", "kind-ci", True, True)
        assert plat.platform_dir == PLATFORM.resolve()
    finally:
        shutil.rmtree(plat.run_dir)
