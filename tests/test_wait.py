"""eventually / consistently: success, retry, convergence, and how they fail."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable

import httpx
import pytest

from fixtures.wait import DEFAULT_RETRY_ON, consistently, eventually

OK = object()  # a scripted attempt that succeeds


class Script:
    """A check that plays back outcomes: OK succeeds, an exception is raised, anything else
    is returned. After the script runs out the last outcome repeats."""

    def __init__(self, outcomes: Iterable[object]):
        self.outcomes = list(outcomes)
        self.calls = 0

    def __call__(self) -> object:
        outcome = self.outcomes[min(self.calls, len(self.outcomes) - 1)]
        self.calls += 1
        if isinstance(outcome, BaseException):
            raise outcome
        return self.calls if outcome is OK else outcome


FAIL = AssertionError("not yet")


# --- eventually -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("outcomes", "converge", "calls"),
    [
        pytest.param([OK], 1, 1, id="first success returns at once"),
        pytest.param([FAIL, FAIL, OK], 1, 3, id="AssertionError is retried"),
        pytest.param([ConnectionRefusedError("refused"), OK], 1, 2, id="OSError is retried"),
        pytest.param([httpx.ConnectError("no route"), OK], 1, 2, id="httpx errors are retried"),
        pytest.param([False, False, OK], 1, 3, id="returning False is a failure"),
        pytest.param([OK, OK, OK], 3, 3, id="converge needs n successes in a row"),
        pytest.param([OK, OK, FAIL, OK, OK, OK], 3, 6, id="a failure resets convergence"),
        pytest.param([OK, False, OK, OK], 2, 4, id="returning False resets convergence"),
    ],
)
def test_eventually_returns_value_of_last_attempt(outcomes, converge, calls):
    check = Script(outcomes)
    assert eventually(check, timeout=5, interval=0.001, converge=converge) == calls
    assert check.calls == calls


@pytest.mark.parametrize("value", [None, 0, "", [], True, "ready"])
def test_eventually_treats_any_return_but_false_as_success(value):
    assert eventually(lambda: value, timeout=1, interval=0.001) == value


def test_eventually_does_not_retry_a_bug_in_the_check():
    check = Script([TypeError("bug in the check")])
    with pytest.raises(TypeError, match="bug in the check"):
        eventually(check, timeout=5, interval=0.001)
    assert check.calls == 1


def test_eventually_retry_on_is_configurable():
    check = Script([ValueError("not parsed yet"), OK])
    assert eventually(check, timeout=5, interval=0.001, retry_on=(ValueError,)) == 2
    with pytest.raises(AssertionError):
        eventually(Script([FAIL]), timeout=5, interval=0.001, retry_on=(ValueError,))


def test_default_retry_on_covers_assertions_and_network_errors():
    for error in (AssertionError, OSError, ConnectionError, httpx.HTTPError):
        assert issubclass(error, DEFAULT_RETRY_ON)


def test_eventually_timeout_message_says_what_how_long_and_last_error():
    check = Script([FAIL, FAIL, AssertionError("status 503, want 200")])
    start = time.monotonic()
    with pytest.raises(AssertionError) as excinfo:
        eventually(check, timeout=0.2, interval=0.02, what="gateway ready")
    elapsed = time.monotonic() - start
    message = str(excinfo.value)
    assert message.startswith("gateway ready: did not succeed within 0.2s")
    assert f"{check.calls} attempts" in message
    assert "s elapsed" in message
    assert "last error: AssertionError: status 503, want 200" in message
    assert isinstance(excinfo.value.__cause__, AssertionError)
    assert 0.2 <= elapsed < 2
    assert 2 <= check.calls <= 12  # polled every 20 ms at most, never busy-looping


def test_eventually_timeout_message_shows_convergence_and_last_value():
    check = Script([OK, FAIL] * 1000)  # never two successes in a row
    with pytest.raises(AssertionError) as excinfo:
        eventually(check, timeout=0.05, interval=0.005, converge=2, what="route converged")
    message = str(excinfo.value)
    assert "route converged" in message
    assert "/2 consecutive successes at the end" in message
    assert ("last error: AssertionError: not yet" in message) or ("last value: " in message)


def test_eventually_timeout_message_reports_false_return():
    with pytest.raises(AssertionError, match="last attempt returned False"):
        eventually(lambda: False, timeout=0.01, interval=0.005, what="pod gone")


def test_eventually_names_the_function_when_what_is_empty():
    def listener_bound() -> None:
        raise AssertionError("port closed")

    with pytest.raises(AssertionError, match="listener_bound.*port closed"):
        eventually(listener_bound, timeout=0, interval=0.01)


def test_eventually_with_zero_timeout_tries_exactly_once():
    check = Script([FAIL])
    with pytest.raises(AssertionError, match="1 attempts"):
        eventually(check, timeout=0, interval=0.01)
    assert check.calls == 1


def test_eventually_hides_itself_from_tracebacks():
    assert "__tracebackhide__" in eventually.__code__.co_varnames
    assert "__tracebackhide__" in consistently.__code__.co_varnames


@pytest.mark.parametrize(
    "kwargs",
    [
        pytest.param({"timeout": -1}, id="negative timeout"),
        pytest.param({"timeout": 1, "interval": 0}, id="zero interval"),
        pytest.param({"timeout": 1, "converge": 0}, id="converge below one"),
    ],
)
def test_eventually_rejects_bad_arguments(kwargs):
    with pytest.raises(ValueError):
        eventually(lambda: None, **kwargs)


# --- consistently -----------------------------------------------------------------------------


def test_consistently_polls_for_the_whole_duration_and_returns_last_value():
    check = Script([OK])
    start = time.monotonic()
    assert consistently(check, duration=0.1, interval=0.01) == check.calls
    assert time.monotonic() - start >= 0.1
    assert 2 <= check.calls <= 12


@pytest.mark.parametrize(
    ("outcomes", "expected"),
    [
        pytest.param([OK, OK, AssertionError("got 200, want 403")], "error: AssertionError: got 200, want 403",
                     id="an assertion fails it"),
        pytest.param([OK, ConnectionResetError("reset")], "error: ConnectionResetError: reset",
                     id="a network error fails it"),
        pytest.param([OK, OK, False], "returned False", id="returning False fails it"),
    ],
)
def test_consistently_fails_on_first_failure_with_context(outcomes, expected):
    check = Script(outcomes)
    with pytest.raises(AssertionError) as excinfo:
        consistently(check, duration=5, interval=0.001, what="cross-tenant call denied")
    message = str(excinfo.value)
    assert message.startswith("cross-tenant call denied:")
    assert f"attempt {len(outcomes)}" in message
    assert expected in message
    assert check.calls == len(outcomes)  # stopped at the first failure


def test_consistently_does_not_swallow_a_bug_in_the_check():
    with pytest.raises(KeyError):
        consistently(Script([KeyError("tenant")]), duration=1, interval=0.001)


def test_consistently_with_zero_duration_checks_once():
    check = Script([OK])
    consistently(check, duration=0, interval=0.01)
    assert check.calls == 1


def _sleeps_recorded(monkeypatch) -> list[float]:
    sleeps: list[float] = []
    real_sleep = time.sleep

    def record(seconds: float) -> None:
        sleeps.append(seconds)
        real_sleep(seconds)

    monkeypatch.setattr(time, "sleep", record)
    return sleeps


@pytest.mark.parametrize(
    "run",
    [
        pytest.param(lambda: eventually(Script([FAIL] * 3 + [OK]), timeout=5, interval=0.01), id="eventually"),
        pytest.param(lambda: consistently(Script([OK]), duration=0.05, interval=0.01), id="consistently"),
    ],
)
def test_only_sleeps_are_poll_intervals(monkeypatch, run: Callable[[], object]):
    sleeps = _sleeps_recorded(monkeypatch)
    run()
    assert sleeps
    assert all(0 < s <= 0.01 for s in sleeps)
