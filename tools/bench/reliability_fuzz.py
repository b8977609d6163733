"""Property-based fuzzing of protocol v1 (hypothesis): the parser in-process and the framing on a live socket.

Frames come from five strategies: random bytes, random JSON values, valid requests of every op, near-valid requests
(a valid one with wrong types, missing or unknown fields, huge numbers, unicode and half surrogate pairs put in),
and near-valid requests with bytes spliced in. Generation only (no shrinking): every frame is judged and the bad
ones counted.
"""

from __future__ import annotations

import dataclasses
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, Phase, given, seed, settings
from hypothesis import strategies as st
from reliability_common import Lab, RawConnection, fake, tracebacks

from edge_llama.client import Client
from edge_llama.errors import WIRE_ERRORS
from edge_llama.protocol import RequestError, encode, error_event, parse_request

MAX_MESSAGES = 64  # the daemon's default server.max_messages, used for the in-process parse too
LINE_LIMIT = 64 * 1024  # the socket fuzz daemon's server.max_line_bytes: oversized frames stay cheap to send
HELLO = b'{"id":"hello","op":"health"}\n'  # starts each connection: a first uppercase byte would make it HTTP


def dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False)


LEAF = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=16)
JSON_VALUE = st.recursive(LEAF, lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=8), kids,
                                                                                          max_size=4), max_leaves=10)
# JSON texts that no generated Python value serializes to: integers past Python's 4300-digit conversion limit,
# floats that overflow, half surrogate pairs (valid JSON escapes that are not characters), NUL, and nesting past
# the interpreter's recursion limit (1000).
ODD_STRINGS = ['"\\ud800"', '"x\\udfff"', '"\\ud83d\\ude00"', '"\\u0000"', '"\\udc00\\ud800"']
ODD_LITERALS = ["1" * 5000, "-" + "9" * 4400, "1e999", "-1e999", "1e-999", "NaN", "-Infinity", "-0",
                "18446744073709551617", "[" * 1200 + "]" * 1200, '{"a":' * 1100 + "1" + "}" * 1100, *ODD_STRINGS]
STRING_TEXT = st.text(max_size=40).map(dumps) | st.sampled_from(ODD_STRINGS)  # a JSON string, as text
VALUE_TEXT = st.one_of(JSON_VALUE.map(dumps), st.sampled_from(ODD_LITERALS), STRING_TEXT)
# op -> (required fields, optional fields) of a valid request, values as JSON text
FIELDS = {
    "chat": ({"messages": '[{"role":"user","content":"hi"}]'},
             {"session": '"fz"', "max_tokens": "8", "temperature": "0.5", "top_p": "0.9", "seed": "7",
              "stream": "false"}),
    "summarize": ({"text": '"One. Two. Three."'}, {"max_tokens": "8", "style": '"bullets"', "stream": "false"}),
    "cancel": ({"target": '"c1"'}, {}),
    "forget": ({"session": '"fz"'}, {}),
    "health": ({}, {}),
    "stats": ({}, {}),
}
ALL_FIELDS = sorted({"id", "op"}.union(*(set(req) | set(opt) for req, opt in FIELDS.values())))
MESSAGE = st.builds('{{"role":"{}","content":{}}}'.format, st.sampled_from(["user", "system", "assistant", "wizard"]),
                    STRING_TEXT)


FEW_IDS = st.sampled_from(['"c1"', '"c2"', '"c3"'])  # few ids: cancel targets and duplicate ids meet running ones


@st.composite
def valid(draw: st.DrawFn, ids: st.SearchStrategy[str] = FEW_IDS) -> dict[str, str]:
    """A valid request of any op, as field -> JSON text."""
    op = draw(st.sampled_from(sorted(FIELDS)))
    required, optional = FIELDS[op]
    fields = {"id": draw(ids), "op": dumps(op), **required}
    fields.update({key: value for key, value in optional.items() if draw(st.booleans())})
    return fields


def as_frame(fields: dict[str, str]) -> bytes:
    return ("{" + ",".join(f"{dumps(key)}:{value}" for key, value in fields.items()) + "}").encode()


@st.composite
def near_valid(draw: st.DrawFn) -> bytes:
    fields = draw(valid(FEW_IDS | STRING_TEXT | st.text(max_size=130).map(dumps)))
    for _ in range(draw(st.integers(1, 3))):
        change = draw(st.sampled_from(["set", "drop", "unknown", "messages"]))
        if change == "set":
            fields[draw(st.sampled_from(ALL_FIELDS))] = draw(VALUE_TEXT)
        elif change == "drop" and fields:
            del fields[draw(st.sampled_from(sorted(fields)))]
        elif change == "unknown":
            fields[draw(st.text(min_size=1, max_size=12))] = draw(VALUE_TEXT)
        else:  # up to past the 64-message limit
            fields["messages"] = "[" + ",".join(draw(st.lists(MESSAGE, max_size=70))) + "]"
    return as_frame(fields)


@st.composite
def spliced(draw: st.DrawFn) -> bytes:
    frame = draw(near_valid())
    at = draw(st.integers(0, len(frame)))
    return frame[:at] + draw(st.binary(min_size=1, max_size=4)) + frame[at + draw(st.integers(0, 2)):]


FRAMES = st.one_of(st.binary(max_size=200), JSON_VALUE.map(lambda v: dumps(v).encode()), valid().map(as_frame),
                   near_valid(), spliced())


def collect(count: int, seed_value: int) -> list[bytes]:
    """`count` frames from FRAMES, reproducibly for a seed."""
    frames: list[bytes] = []

    @seed(seed_value)
    @settings(max_examples=count, database=None, deadline=None, phases=[Phase.generate],
              suppress_health_check=list(HealthCheck))
    @given(FRAMES)
    def gather(frame: bytes) -> None:
        frames.append(frame)

    gather()
    return frames


def judge(line: bytes) -> tuple[str, str | None, str | None]:
    """What the parser makes of one line: ("valid", id, None), ("error", id, code), or ("bug", None, what)."""
    try:
        request = parse_request(line, MAX_MESSAGES)
    except RequestError as exc:
        if exc.code not in WIRE_ERRORS:
            return "bug", None, f"code {exc.code!r}"
        try:
            encode(error_event(exc.request_id, exc))
        except Exception as err:  # the daemon could not send this error
            return "bug", None, f"error reply not encodable ({type(err).__name__})"
        return "error", exc.request_id, exc.code
    except Exception as exc:
        return "bug", None, f"{type(exc).__name__}: {str(exc)[:60]}"
    try:  # what the daemon goes on to do with it (tokenize, store, echo) needs real text
        json.dumps(dataclasses.asdict(request), ensure_ascii=False).encode("utf-8")
    except UnicodeEncodeError:
        return "bug", None, "parsed, but its strings are not text (half a surrogate pair)"
    return "valid", request.id, None


def parser_fuzz(frames: int, seed_value: int) -> dict[str, Any]:
    """Every frame either parses or raises RequestError with a wire code (and a reply the daemon can encode)."""
    started = time.monotonic()
    outcomes: Counter[str] = Counter()
    bugs: Counter[str] = Counter()
    examples: list[str] = []
    generated = collect(frames, seed_value)
    for frame in generated:
        kind, _, detail = judge(frame)
        outcomes[detail if kind == "error" else kind] += 1
        if kind == "bug":
            if not bugs[str(detail)]:  # one example of each kind
                examples.append(f"{detail}: {frame[:80]!r}")
            bugs[str(detail)] += 1
    return {"frames": len(generated), "parsed": outcomes.pop("valid", 0), "errors_by_code": dict(outcomes),
            "unexpected": sum(bugs.values()), "unexpected_kinds": dict(bugs), "examples": examples,
            "seconds": round(time.monotonic() - started, 1)}


def oversized(rng: random.Random) -> bytes:
    size = LINE_LIMIT + rng.randrange(LINE_LIMIT)
    if rng.random() < 0.5:
        return b"z" * size
    return b'{"id":"big","op":"chat","messages":[{"role":"user","content":"' + b"x" * size + b'"}]}'


def expect(line: bytes) -> tuple[str, str | None, str | None] | None:
    """The reply a line must get: None (blank lines are skipped), or (kind, id, code) as `judge` says; a line over
    the limit is `too_large` without an id. A parser bug must still get an error line (any code, no id)."""
    if len(line) + 1 > LINE_LIMIT:
        return "error", None, "too_large"
    if not line.strip():
        return None
    kind, request_id, code = judge(line)
    return ("error", None, None) if kind == "bug" else (kind, request_id, code)


class SocketFuzz:
    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self.figures: Counter[str] = Counter()
        self.examples: list[str] = []
        self.conn = self.connect()

    def connect(self) -> RawConnection:
        conn = RawConnection(self.sock)
        conn.send(HELLO)
        hello = conn.line(time.monotonic() + 10)
        assert hello and hello.get("event") == "done", hello
        return conn

    def unexpected(self, what: str, detail: Any, count: int = 1) -> None:
        self.figures["unexpected"] += count
        if len(self.examples) < 6:
            self.examples.append(f"{what}: {str(detail)[:160]}")

    def group(self, lines: list[bytes], rng: random.Random) -> None:
        """Send lines in one payload (split at random points over several writes, or not), then match every reply
        line to a line that asked for it."""
        payload = b"\n".join(lines) + b"\n"
        outstanding = [e for e in map(expect, payload.split(b"\n")[:-1]) if e is not None]
        self.figures["frames_sent"] += len(outstanding)
        pieces = rng.choice([1, 1, 2, 3, 5])
        deadline = time.monotonic() + 20
        try:
            if pieces > 1 and len(payload) > pieces:
                cuts = sorted(rng.sample(range(1, len(payload)), pieces - 1))
                self.figures["split_writes"] += 1
                for start, end in zip([0, *cuts], [*cuts, len(payload)], strict=True):
                    self.conn.send(payload[start:end])
                    time.sleep(0.001)  # so the daemon reads the pieces separately
            else:
                self.conn.send(payload)
            self.figures["writes"] += 1
            while outstanding:
                event = self.conn.line(deadline)
                if event is None:
                    self.unexpected("unanswered", outstanding[:3], len(outstanding))
                    self.figures["unanswered"] += len(outstanding)
                    return
                self.match(event, outstanding)
        except ConnectionError:
            self.unexpected("connection closed by the daemon", outstanding[:3], len(outstanding))
            self.figures["unanswered"] += len(outstanding)
            self.figures["connection_drops"] += 1
            self.conn = self.connect()

    def match(self, event: dict[str, Any], outstanding: list[tuple[str, str | None, str | None]]) -> None:
        kind, rid = event.get("event"), event.get("id")
        if kind in ("token", "progress"):
            if not any(e[0] == "valid" and e[1] == rid for e in outstanding):
                self.unexpected("stray line", event)
            return
        if kind not in ("done", "error") or (kind == "error" and event.get("code") not in WIRE_ERRORS):
            self.unexpected("not a protocol reply", event)
            return
        # A parse error is matched first (they are answered in order); else a valid request with that id.
        candidates = [e for e in outstanding if e[1] == rid and kind == "error" and e[0] == "error"
                      and e[2] in (None, event.get("code"))]
        candidates += [e for e in outstanding if e[0] == "valid" and e[1] == rid]
        if not candidates:
            self.unexpected("reply to nothing", event)
            return
        outstanding.remove(candidates[0])
        self.figures["answered"] += 1


def socket_fuzz(lab: Lab, frames: int, seed_value: int) -> dict[str, Any]:
    """Frames on a live daemon, 1-12 per write, some writes split, some lines oversized: each non-blank line is
    answered by exactly one terminal line, and a real chat works afterwards."""
    started = time.monotonic()
    d = lab.start(fake(reply="ok", server={"max_line_bytes": LINE_LIMIT}), name="fuzz")
    rng = random.Random(seed_value)
    generated = collect(frames, seed_value + 1)
    fuzz = SocketFuzz(d.socket)
    at = 0
    while at < len(generated):
        lines = generated[at:at + rng.randint(1, 12)]
        at += len(lines)
        if rng.random() < 0.03:
            lines.insert(rng.randrange(len(lines) + 1), oversized(rng))
            fuzz.figures["oversized"] += 1
        fuzz.group(lines, rng)
    fuzz.conn.close()
    with Client(d.socket, timeout=30) as c:
        done = c.call({"op": "chat", "messages": [{"role": "user", "content": "still there?"}]})
    serving = done.get("finish_reason") == "stop" and d.proc.poll() is None
    return {**{k: fuzz.figures[k] for k in ("frames_sent", "answered", "unexpected", "unanswered",
                                            "connection_drops", "writes", "split_writes", "oversized")},
            "serving_after": serving, "tracebacks_in_log": tracebacks(lab.log(d)), "examples": fuzz.examples,
            "seconds": round(time.monotonic() - started, 1)}
