"""Commands as data: argument lists only, bounded, redacted, and the same steps whether
run for real (against fake tools here) or printed as a plan."""

from __future__ import annotations

import dataclasses
import json
import time

import pytest

from fixtures.cluster.commands import (
    Command,
    CommandError,
    Executor,
    Poll,
    Recorder,
    Redactor,
    format_plan,
)
from fixtures.cluster.fakes import FakeTools
from fixtures.cluster.kubectl import Kubectl, deployments_ready


@pytest.fixture
def fakes(tmp_path):
    f = FakeTools(tmp_path / "fakes")
    f.install("tool")
    return f


def tool(fakes: FakeTools) -> str:
    return f"{fakes.bin}/tool"


def test_a_shell_string_is_refused():
    with pytest.raises(TypeError):
        Command("kubectl get pods", "a shell string")
    with pytest.raises(TypeError):
        Command(("kubectl", 3), "not all strings")


def test_argv_reaches_the_tool_verbatim_without_a_shell(fakes):
    # Shell metacharacters stay literal: no shell ever parses them.
    fakes.on("tool", stdout="ok")
    tricky = ["a b", "$(touch pwned)", "x;y", "*", "'quoted'"]
    result = Executor().run(Command((tool(fakes), *tricky), "tricky argv"))
    assert result.stdout == "ok"
    assert fakes.argvs("tool") == [tricky]
    assert not (fakes.root / "pwned").exists()


def test_manifest_goes_to_stdin(fakes):
    Executor().run(Command((tool(fakes), "apply", "-f", "-"), "apply", stdin="kind: Namespace\n"))
    assert fakes.calls("tool")[0]["stdin"] == "kind: Namespace\n"


def test_failure_names_command_exit_and_stderr_with_secrets_masked(fakes):
    redact = Redactor()
    redact.add("hunter2-password")
    fakes.on("tool", stderr="error: bad password hunter2-password\n", exit=3)
    with pytest.raises(CommandError) as err:
        Executor(redact=redact).run(Command((tool(fakes), "login", "--password=hunter2-password"), "log in"))
    text = str(err.value)
    assert "exited 3" in text and "log in" in text and "bad password" in text
    assert "hunter2-password" not in text
    assert "****" in text


def test_log_records_commands_redacted(fakes, tmp_path):
    redact = Redactor()
    redact.add("s3cr3t-token")
    log = tmp_path / "commands.log"
    Executor(log, redact=redact).run(Command((tool(fakes), "--token", "s3cr3t-token"), "with a token"))
    text = log.read_text()
    assert "--token" in text and "s3cr3t-token" not in text


def test_timeout_bounds_a_hanging_tool(fakes):
    fakes.on("tool", sleep=30)
    started = time.monotonic()
    with pytest.raises(CommandError, match="did not finish within 0.5s"):
        Executor().run(Command((tool(fakes),), "hangs", timeout=0.5))
    assert time.monotonic() - started < 5


def test_missing_tool_says_how_to_get_it(tmp_path):
    with pytest.raises(CommandError, match="make cluster-tools"):
        Executor().run(Command((str(tmp_path / "no-such-kind"), "version"), "kind version"))


def test_poll_stops_at_the_first_success(fakes):
    # The pytest-kind bug: a retry loop that keeps going after success. Here the third
    # answer is ready, and there must be no fourth call.
    fakes.sequence("tool", "get", answers=[{"stdout": json.dumps({"items": []})},
                                           {"stdout": json.dumps({"items": []})},
                                           {"stdout": json.dumps({"items": [{"metadata": {"name": "d", "generation": 1},
                                                                             "spec": {"replicas": 1},
                                                                             "status": {"observedGeneration": 1,
                                                                                        "updatedReplicas": 1,
                                                                                        "availableReplicas": 1}}]})}])
    kubectl = Kubectl(Executor(), tool(fakes), "ctx", poll_interval=0.01)
    kubectl.wait_deployments("ns", timeout=20)
    assert len(fakes.argvs("tool")) == 3


def test_poll_is_bounded_and_says_what_it_waited_for(fakes):
    fakes.on("tool", "get", stdout=json.dumps({"items": [{"metadata": {"name": "slow", "generation": 1},
                                                          "spec": {"replicas": 2},
                                                          "status": {"observedGeneration": 1,
                                                                     "availableReplicas": 1}}]}))
    kubectl = Kubectl(Executor(), tool(fakes), "ctx", poll_interval=0.05)
    started = time.monotonic()
    with pytest.raises(CommandError) as err:
        kubectl.wait_deployments("ns", timeout=0.5)
    assert time.monotonic() - started < 5
    assert "every Deployment in ns available" in str(err.value)
    assert "slow (1/2 available, 0 updated)" in str(err.value)


def deployment(want: int, *, replicas: int | None, updated: int, available: int, generation: int = 2,
               observed: int = 2, conditions: list | None = None) -> dict:
    """A Deployment as the API server returns it (zero counts left out of status)."""
    status = {k: v for k, v in {"observedGeneration": observed, "replicas": replicas, "updatedReplicas": updated,
                                "availableReplicas": available}.items() if v}
    if conditions:
        status["conditions"] = conditions
    return {"items": [{"metadata": {"name": "gw", "generation": generation}, "spec": {"replicas": want},
                       "status": status}]}


@pytest.mark.parametrize("doc, says", [
    # the new pod is up, the old one still takes connections (what `kubectl rollout status` waits out)
    (deployment(1, replicas=2, updated=1, available=2), "gw (1 old replica(s) pending termination)"),
    (deployment(2, replicas=3, updated=2, available=2), "gw (1 old replica(s) pending termination)"),
    (deployment(2, replicas=2, updated=1, available=2), "gw (2/2 available, 1 updated)"),
    (deployment(1, replicas=1, updated=1, available=1, observed=1), "gw (spec not observed yet)"),
    (deployment(2, replicas=2, updated=1, available=1, conditions=[
        {"type": "Progressing", "status": "False", "reason": "ProgressDeadlineExceeded"}]),
     "gw (1/2 available, 1 updated, progress deadline exceeded)"),
], ids=["surge pod left", "two of three", "old pods available", "new spec unseen", "deadline"])
def test_a_rollout_with_old_replicas_left_is_not_ready(doc, says):
    with pytest.raises(AssertionError) as err:
        deployments_ready(doc)
    assert str(err.value) == f"not ready: {says}"


@pytest.mark.parametrize("doc", [deployment(1, replicas=1, updated=1, available=1),
                                 deployment(2, replicas=2, updated=2, available=2),
                                 deployment(0, replicas=None, updated=0, available=0)],
                         ids=["one", "two", "scaled to zero"])
def test_a_complete_rollout_is_ready(doc):
    assert deployments_ready(doc)


WEBHOOK_NOT_SERVING = {"stderr": 'Error from server (InternalError): Internal error occurred: failed calling webhook '
                                 '"webhook.cert-manager.io": connect: connection refused\n', "exit": 1}
NAMESPACE = [{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n"}}]


def test_an_apply_refused_by_a_webhook_not_yet_serving_is_repeated_until_accepted(fakes):
    fakes.sequence("tool", "apply", answers=[WEBHOOK_NOT_SERVING, WEBHOOK_NOT_SERVING, {"stdout": "applied\n"}])
    kubectl = Kubectl(Executor(), tool(fakes), "ctx", poll_interval=0.01)
    assert kubectl.apply(NAMESPACE, what="the platform", retry_for=20).stdout == "applied\n"
    calls = fakes.calls("tool")
    assert len(calls) == 3 and all(c["stdin"] == calls[0]["stdin"] for c in calls)


def test_an_apply_without_retry_fails_at_once_and_a_retried_one_is_bounded(fakes):
    fakes.on("tool", "apply", **WEBHOOK_NOT_SERVING)
    kubectl = Kubectl(Executor(), tool(fakes), "ctx", poll_interval=0.05)
    with pytest.raises(CommandError, match="failed calling webhook"):
        kubectl.apply(NAMESPACE, what="the platform")
    assert len(fakes.calls("tool")) == 1
    with pytest.raises(CommandError, match="the platform accepted"):
        kubectl.apply(NAMESPACE, what="the platform", retry_for=0.5)


def test_every_kubectl_call_names_the_context():
    rec = Recorder()
    k = Kubectl(rec, "kubectl", "kind-x")
    k.apply([{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "n"}}], what="ns")
    k.get_json("pods", namespace="n")
    k.label("namespace", "n", {"a": "b", "c": None}, what="label")
    for cmd in rec.commands():
        assert cmd.argv[:3] == ("kubectl", "--context", "kind-x")
    assert rec.commands()[2].argv[-2:] == ("a=b", "c-")


def test_recorder_runs_nothing_and_plan_lists_commands_and_manifests():
    rec = Recorder()
    rec.section("phase one")
    rec.run(Command(("kind", "create", "cluster", "--name", "x"), "create"))
    rec.poll(Poll(Command(("kubectl", "get", "deployments"), "read"), deployments_ready, "ready", 60))
    rec.run(Command(("kubectl", "apply", "-f", "-"), "apply",
                    stdin="apiVersion: v1\nkind: Namespace\nmetadata:\n  name: n\n"))
    rec.run(Command(("kubectl", "exec", "-i", "p", "--", "python", "-c", "import x\nprint(1)\n"), "exec",
                    stdin='{"headers": {"authorization": "Bearer secret"}}', stdin_label="the request"))
    text = format_plan(rec.history)
    assert "## phase one" in text
    assert "1. [run] create" in text and "$ kind create cluster --name x" in text
    assert "[poll] read until ready" in text
    assert "- Namespace n" in text
    assert "stdin: the request" in text and "Bearer" not in text
    assert "<2-line script: import x ...>" in text
    assert len(rec.commands()) == 4
    assert "kind: Namespace" in format_plan(rec.history, manifests=True)


def test_local_commands_run_even_in_a_dry_run(fakes):
    fakes.on("tool", stdout="rendered")
    rec = Recorder()
    assert rec.run(Command((tool(fakes), "kustomize", "."), "render", local=True)).stdout == "rendered"
    assert rec.run(Command((tool(fakes), "apply"), "apply")).stdout == ""
    assert fakes.argvs("tool") == [["kustomize", "."]]


def test_redactor_masks_longest_first_and_ignores_tiny_values():
    r = Redactor()
    r.add("abc")  # too short to redact safely
    r.add("password")
    r.add("password-and-more")
    assert r("x password-and-more y password abc") == "x **** y **** abc"


def test_command_is_immutable():
    cmd = Command(("a",), "x")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cmd.argv = ("b",)  # type: ignore[misc]
