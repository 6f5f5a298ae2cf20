"""The progress line: live on a terminal, two plain lines elsewhere, and never in the way of
pytest's output capture (checked in real pytest sessions on a pseudo-terminal and on pipes)."""

from __future__ import annotations

import io
import os
import pty
import re
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from fixtures import progress as progress_module
from fixtures.progress import detail, progress, step

REPO = Path(__file__).resolve().parents[1]


class FakeTerminal(io.StringIO):
    """A stream that says it is a terminal."""

    def isatty(self) -> bool:
        return True


def test_plain_output_is_a_start_and_an_end_line_with_step_times():
    out = io.StringIO()
    with progress("starting the platform", stream=out) as p:
        assert not p.live
        step("rendering")
        detail("not shown in plain output")
        step("waiting")
    lines = out.getvalue().splitlines()
    assert lines[0] == "starting the platform ..."
    assert re.fullmatch(r"starting the platform: done in \d+\.\ds \(rendering \d+\.\ds, waiting \d+\.\ds\)", lines[1])
    assert len(lines) == 2 and "\r" not in out.getvalue() and "\x1b" not in out.getvalue()


def test_failure_names_the_step_and_propagates():
    out = io.StringIO()
    with pytest.raises(RuntimeError, match="moto died"):
        with progress("starting the platform", stream=out):
            step("waiting for moto")
            raise RuntimeError("moto died")
    assert re.search(r"starting the platform: failed after \d+\.\ds during waiting for moto \(RuntimeError\)",
                     out.getvalue()), out.getvalue()


def test_terminal_line_is_redrawn_in_place_with_the_elapsed_time():
    term = FakeTerminal()
    with progress("rollout of tenanta/rag-api", stream=term, interval=0.05) as p:
        assert p.live
        detail("Progressing, canary weight 20%")
        time.sleep(0.3)   # long enough for the redraw thread to tick several times
    text = term.getvalue()
    draws = re.findall(r"\rrollout of tenanta/rag-api: Progressing, canary weight 20% \[(\d+\.\d)s\]\x1b\[K", text)
    assert len(draws) >= 3 and float(draws[-1]) > float(draws[0]), text   # the clock moved between redraws
    assert re.search(r"\rrollout of tenanta/rag-api: done in \d+\.\ds \(Progressing, canary weight 20%\)\x1b\[K\n$",
                     text), text
    assert p._ticker is not None and not p._ticker.is_alive()


def test_a_long_line_is_cut_in_the_middle_and_keeps_the_elapsed_time():
    p = progress("starting the standalone platform", stream=io.StringIO())
    with p:
        step("waiting for the processes to become healthy")
        detail("envoy:tenanta/rag-api-primary")
        line = p.line(width=40)
    assert len(line) < 40 and line.startswith("starting the standalone") and re.search(r"\.\.\. \[\d+\.\ds\]$", line)


def test_nested_lines_draw_only_the_innermost():
    term = FakeTerminal()
    with progress("outer", stream=term, interval=0.02):
        with progress("inner", stream=term, interval=0.02):
            before = len(term.getvalue())
            time.sleep(0.15)
            during = term.getvalue()[before:]
        assert "\router" not in during and "\rinner" in during
    assert term.getvalue().endswith("\x1b[K\n")


def test_step_and_detail_without_an_open_line_do_nothing(capsys):
    step("nobody is watching")
    detail("still nobody")
    assert capsys.readouterr() == ("", "")


def test_bad_description_is_refused():
    with pytest.raises(ValueError, match="one-line description"):
        progress("two\nlines", stream=io.StringIO())


def test_a_broken_terminal_never_fails_the_step():
    term = FakeTerminal()
    with progress("building", stream=term, interval=0.02):
        term.close()           # the terminal went away (ssh dropped)
        time.sleep(0.05)
    assert progress_module._open == []


# -- inside real pytest sessions -------------------------------------------------------------------

SESSION = '''
import time
from fixtures.progress import progress, step

def test_slow_step():
    print("OUTPUT-OF-THE-TEST")
    with progress("slow thing"):
        step("first half")
        time.sleep(1.3)   # the elapsed time being drawn is what is tested
        step("second half")
    assert FAIL is False
'''


def _session(tmp_path: Path, fail: bool, *args: str, tty: bool) -> str:
    (tmp_path / "test_session.py").write_text(SESSION.replace("FAIL", "True" if fail else "False"))
    argv = [sys.executable, "-m", "pytest", "test_session.py", "-p", "no:cacheprovider", "-p", "fixtures.progress",
            "--rootdir", str(tmp_path), *args]
    env = {**os.environ, "PYTHONPATH": str(REPO), "COLUMNS": "120"}
    if not tty:
        proc = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
        return proc.stdout + proc.stderr
    master, slave = pty.openpty()
    proc = subprocess.Popen(argv, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, stdout=slave, stderr=slave)
    os.close(slave)
    chunks, deadline = [], time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                data = os.read(master, 65536)
            except OSError:   # EIO: the child closed the terminal
                break
            if not data:
                break
            chunks.append(data)
    finally:
        os.close(master)
        proc.kill() if proc.poll() is None else None
        proc.wait(timeout=30)
    return b"".join(chunks).decode("utf-8", "replace")


@pytest.mark.slow
def test_under_pytest_capture_the_line_is_live_on_the_terminal_and_the_output_stays_captured(tmp_path):
    out = _session(tmp_path, False, "-q", tty=True)
    assert "1 passed" in out, out
    assert re.search(r"\rslow thing: first half \[1\.\ds\]", out), out   # redrawn while the test ran
    assert re.search(r"slow thing: done in 1\.\ds \(first half 1\.\ds, second half 0\.\ds\)", out), out
    assert "OUTPUT-OF-THE-TEST" not in out   # the test's own output is still captured


@pytest.mark.slow
def test_with_s_on_a_terminal_the_line_is_live_too(tmp_path):
    out = _session(tmp_path, False, "-q", "-s", tty=True)
    assert "OUTPUT-OF-THE-TEST" in out and re.search(r"\rslow thing: first half \[1\.\ds\]", out), out


@pytest.mark.slow
def test_without_a_terminal_a_passing_test_shows_nothing_and_a_failing_one_shows_two_lines(tmp_path):
    quiet = _session(tmp_path, False, "-q", tty=False)
    assert "1 passed" in quiet and "slow thing" not in quiet, quiet
    failing = _session(tmp_path, True, "-q", tty=False)
    captured = failing[failing.index("Captured stderr call"):]
    assert re.search(r"slow thing \.\.\.\nslow thing: done in 1\.\ds \(first half 1\.\ds, second half 0\.\ds\)\n",
                     captured), failing
    assert "\r" not in failing and "\x1b[K" not in failing


@pytest.mark.slow
def test_without_a_terminal_and_with_s_the_two_lines_go_to_the_log(tmp_path):
    out = _session(tmp_path, False, "-q", "-s", tty=False)
    assert re.search(r"slow thing \.\.\.\n", out) and "slow thing: done in" in out and "\r" not in out, out
