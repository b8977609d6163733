"""Protocol v1 parsing: every malformed request gets a precise code and message, and keeps its id."""

from __future__ import annotations

import json

import pytest

from edge_llama.protocol import ChatRequest, RequestError, SummarizeRequest, encode, parse_request


def parse(obj: object) -> object:
    return parse_request(json.dumps(obj).encode(), max_messages=4)


def test_chat_request_is_typed() -> None:
    req = parse({"id": "a", "op": "chat", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5,
                 "temperature": 0, "session": "s-1", "stream": False})
    assert isinstance(req, ChatRequest)
    assert req.messages[0].content == "hi" and req.max_tokens == 5 and req.temperature == 0.0
    assert req.session == "s-1" and req.stream is False


def test_summarize_defaults() -> None:
    req = parse({"id": "b", "op": "summarize", "text": "long text"})
    assert isinstance(req, SummarizeRequest) and req.style == "paragraph" and req.stream is True


@pytest.mark.parametrize(("obj", "code", "fragment"), [
    ({"id": "x", "op": "dance"}, "bad_request", "unknown op 'dance'"),
    ({"id": "x", "op": "chat", "messages": []}, "bad_request", "non-empty list"),
    ({"id": "x", "op": "chat", "messages": [{"role": "user", "content": 3}]}, "bad_request", "content must be"),
    ({"id": "x", "op": "chat", "messages": [{"role": "robot", "content": "a"}]}, "bad_request", "role must be"),
    ({"id": "x", "op": "chat", "messages": [{"role": "assistant", "content": "a"}]}, "bad_request", "user's"),
    ({"id": "x", "op": "chat", "messages": [{"role": "user", "content": "a"}] * 5}, "too_large", "limit is 4"),
    ({"id": "x", "op": "chat", "messages": [{"role": "user", "content": "a"}], "max_tokens": True},
     "bad_request", "max_tokens' must be a whole number"),
    ({"id": "x", "op": "chat", "messages": [{"role": "user", "content": "a"}], "temperature": 9},
     "bad_request", "temperature"),
    ({"id": "x", "op": "chat", "messages": [{"role": "user", "content": "a"}], "session": "../etc"},
     "bad_request", "session"),
    ({"id": "x", "op": "chat", "messages": [{"role": "user", "content": "a"}], "extra": 1},
     "bad_request", "unknown field 'extra'"),
    ({"id": "x", "op": "summarize", "text": "  "}, "bad_request", "empty"),
    ({"op": "health"}, "bad_request", "'id' is required"),
    ({"id": "x", "op": "forget"}, "bad_request", "'session' is required"),
])
def test_bad_requests(obj: object, code: str, fragment: str) -> None:
    with pytest.raises(RequestError) as info:
        parse(obj)
    assert info.value.code == code
    assert fragment in info.value.message
    assert info.value.request_id == (obj.get("id") if isinstance(obj, dict) else None)  # type: ignore[union-attr]


def test_bad_json_and_utf8() -> None:
    with pytest.raises(RequestError) as info:
        parse_request(b'{"id": "a", ', 4)
    assert info.value.code == "bad_json"
    with pytest.raises(RequestError) as info:
        parse_request(b'{"id": "a\xff"}', 4)
    assert info.value.code == "bad_json" and "UTF-8" in info.value.message
    with pytest.raises(RequestError) as info:
        parse_request(b"[1, 2]", 4)
    assert info.value.code == "bad_request"


def test_encode_is_one_utf8_line() -> None:
    line = encode({"id": "a", "event": "token", "text": "é\n"})
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert json.loads(line)["text"] == "é\n"
