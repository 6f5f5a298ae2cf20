"""The owned port-forward: ready on the first successful connect (and not polled again),
bounded, fails fast with kubectl's words when kubectl exits, restarted when it dies,
and gone (the whole process group) when the block ends."""

from __future__ import annotations

import json
import os
import time
import urllib.request

import pytest

from fixtures.cluster.commands import Executor, Recorder
from fixtures.cluster.fakes import FakeTools
from fixtures.cluster.kubectl import Kubectl
from fixtures.cluster.portforward import PortForward
from fixtures.process import ProcessError, pid_alive


@pytest.fixture
def fakes(tmp_path):
    f = FakeTools(tmp_path / "fakes")
    f.install("kubectl")
    return f


def forward(fakes, tmp_path, timeout=10.0) -> PortForward:
    kubectl = Kubectl(Executor(), f"{fakes.bin}/kubectl", "kind-test")
    return PortForward(kubectl, "istio-system", "svc/prometheus", 9090, log_dir=tmp_path / "logs", timeout=timeout)




def test_forward_is_ready_once_the_port_answers_and_is_stopped_after(fakes, tmp_path):
    body = json.dumps({"status": "success", "data": {"result": []}})
    fakes.on("kubectl", "port-forward", sleep=0.3, listen=True, body=body)
    started = time.monotonic()
    with forward(fakes, tmp_path) as pf:
        assert time.monotonic() - started < 5
        with urllib.request.urlopen(f"{pf.url}/api/v1/query?query=up", timeout=5) as resp:
            assert json.loads(resp.read())["status"] == "success"
        pid = pf.process.pid
        argv = fakes.argvs("kubectl")
    assert argv == [["--context", "kind-test", "port-forward", "-n", "istio-system", "svc/prometheus",
                     f"{pf.local_port}:9090", "--address", "127.0.0.1"]]
    # one kubectl for the whole block: readiness did not start it again
    assert len(fakes.calls("kubectl")) == 1
    assert not pid_alive(pid)


def test_kubectl_exiting_fails_at_once_with_its_message(fakes, tmp_path):
    fakes.on("kubectl", "port-forward", stderr="error: unable to forward port because pod is not running\n", exit=1)
    started = time.monotonic()
    with pytest.raises(ProcessError, match="pod is not running"):
        forward(fakes, tmp_path, timeout=30).start()
    assert time.monotonic() - started < 10  # not the 30 s timeout


def test_a_forward_that_never_listens_times_out(fakes, tmp_path):
    fakes.on("kubectl", "port-forward", sleep=60)
    started = time.monotonic()
    with pytest.raises(ProcessError, match="not healthy after 1s"):
        forward(fakes, tmp_path, timeout=1).start()
    assert time.monotonic() - started < 6


def test_ensure_restarts_a_dead_forward(fakes, tmp_path):
    fakes.on("kubectl", "port-forward", listen=True)
    with forward(fakes, tmp_path) as pf:
        first = pf.process.pid
        pf.process.stop()
        assert not pf.process.running()
        pf.ensure()
        assert pf.process.running() and pf.process.pid != first
        pf.ensure()  # alive: nothing to do
    assert len(fakes.calls("kubectl")) == 2


def test_dry_run_records_the_forward_without_starting_it(tmp_path):
    rec = Recorder()
    pf = PortForward(Kubectl(rec, "kubectl", "ctx"), "ns", "svc/x", 80, log_dir=tmp_path).start()
    assert [c.argv[3] for c in rec.commands()] == ["port-forward"]
    assert pf.process.popen is None
    pf.stop()
