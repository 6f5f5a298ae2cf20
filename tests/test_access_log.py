"""Reading the gateway's JSON access log while Envoy is still writing it."""

from __future__ import annotations

import pytest

from fixtures.standalone.callers import parse_access_log


def test_a_line_still_being_written_is_not_an_entry_yet() -> None:
    text = '{"path": "/a", "code": 200}\n{"path": "/b", "downstream_remote_address": "[2001:db8'
    assert parse_access_log(text) == [{"path": "/a", "code": 200}]


def test_the_line_counts_once_its_newline_is_written() -> None:
    text = '{"path": "/a"}\n{"path": "/b"}\n'
    assert [e["path"] for e in parse_access_log(text)] == ["/a", "/b"]


@pytest.mark.parametrize("text", ["", "\n", '{"path": "/partial'])
def test_no_complete_line_is_no_entries(text: str) -> None:
    assert parse_access_log(text) == []


def test_a_complete_line_that_is_not_json_is_an_error_naming_it() -> None:
    with pytest.raises(ValueError, match=r"line 2 is not JSON.*not json"):
        parse_access_log('{"path": "/a"}\nnot json\n')
