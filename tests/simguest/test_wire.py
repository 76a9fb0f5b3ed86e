from __future__ import annotations

import json

from daemon.simguest.wire import (
    MAX_NESTING,
    JsonStream,
    ParseError,
    command_not_found,
    encode,
    error_reply,
    event_message,
    return_reply,
)


def test_values_split_across_chunks_and_joined_on_one_line() -> None:
    stream = JsonStream()
    assert stream.feed(b'{"execute": "query-') == []
    assert stream.feed(b'status"}{"execute"') == [{"execute": "query-status"}]
    assert stream.feed(b': "a"}\n{"execute": "b"}\r\n') == [{"execute": "a"}, {"execute": "b"}]


def test_braces_and_escaped_quotes_inside_strings_do_not_end_a_value() -> None:
    stream = JsonStream()
    text = {"execute": "x", "id": 'a}"]\\{'}
    assert stream.feed(json.dumps(text).encode()) == [text]


def test_top_level_scalars_and_arrays_are_values() -> None:
    stream = JsonStream()
    assert stream.feed(b'[1, 2] "x" 5 ') == [[1, 2], "x", 5]


def test_invalid_json_is_a_parse_error_and_the_stream_recovers() -> None:
    stream = JsonStream()
    values = stream.feed(b'{bad json}\n{"execute": "ok"}')
    assert isinstance(values[0], ParseError)
    assert values[0].desc == "JSON parse error, invalid keyword 'bad'"
    assert values[1] == {"execute": "ok"}


def test_nesting_beyond_qemus_limit_is_refused() -> None:
    stream = JsonStream()
    values = stream.feed(b"[" * (MAX_NESTING + 1))
    assert values == [ParseError("JSON parse error, nesting too deep")]
    assert stream.feed(b'{"execute": "ok"}') == [{"execute": "ok"}]


def test_event_timestamp_is_split_into_seconds_and_microseconds() -> None:
    message = event_message("STOP", None, now=1700000000.25)
    assert message == {
        "timestamp": {"seconds": 1700000000, "microseconds": 250000},
        "event": "STOP",
    }
    with_data = event_message("BALLOON_CHANGE", {"actual": 5}, now=1.0)
    assert with_data["data"] == {"actual": 5}


def test_encode_is_one_crlf_terminated_line() -> None:
    raw = encode({"return": {}, "id": "a\nb"})
    assert raw.endswith(b"\r\n") and raw.count(b"\n") == 1
    assert json.loads(raw) == {"return": {}, "id": "a\nb"}


def test_replies_are_byte_for_byte_what_qemu_sends() -> None:
    # Captured from qemu-system-x86_64 7.2 over a raw socket.
    assert encode(return_reply({}, 1, has_id=True)) == b'{"return": {}, "id": 1}\r\n'
    assert encode(error_reply(command_not_found("nope"), 2, has_id=True)) == (
        b'{"id": 2, "error": {"class": "CommandNotFound", '
        b'"desc": "The command nope has not been found"}}\r\n'
    )
