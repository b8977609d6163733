"""`edge-llama chat`: one-shot answers and the interactive prompt.

Interactive mode keeps the conversation in a daemon session, streams answers as they are generated, reads
multi-line input (a line ending in a backslash continues; a line of three double quotes opens and closes a
block), keeps input history (readline), and treats Ctrl-C during an answer as "stop this answer" (the daemon is
sent a `cancel`), at the prompt as "clear the line"; Ctrl-D or /exit leaves.
"""

from __future__ import annotations

import argparse
import contextlib
import secrets
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from edge_llama.client import Client, ConnectionLost
from edge_llama.config import state_dir
from edge_llama.errors import BadRequest, EdgeLlamaError, NotFound, Unavailable

T = TypeVar("T")
RECONNECT_S = 30.0  # how long the prompt waits for a restarting daemon (a model load takes seconds)

HELP = """commands:
  /reset   forget this conversation          /stats   daemon statistics
  /exit    leave (or Ctrl-D)                 /help    this text
input: end a line with \\ to continue it; a line with only \"\"\" opens and closes a multi-line block.
Ctrl-C stops the answer being written."""


def run_chat(sock: Path, args: argparse.Namespace) -> int:
    if args.message is not None or not sys.stdin.isatty():
        text = args.message if args.message is not None else sys.stdin.read()
        if not text.strip():
            raise BadRequest("nothing to send: the message is empty")
        request = _request(args, text, first=True)
        if args.session:
            request["session"] = args.session
        with Client(sock) as client:
            finish = stream_answer(client, request)
        return 0 if finish != "cancelled" else 130
    link = Link(sock)
    try:
        return interactive(link, args)
    finally:
        link.client.close()


class Link:
    """The interactive prompt's connection to the daemon. When the daemon restarts (an upgrade, the systemd
    watchdog, a config change), the prompt connects again and the conversation goes on: it lives in the
    daemon's session files, not in the connection."""

    def __init__(self, sock: Path) -> None:
        self.sock = sock
        self.client = Client(sock)

    def run(self, action: Callable[[Client], T], wait_s: float = RECONNECT_S) -> T:
        """`action` on the current connection; on a new one (waiting up to `wait_s` for the daemon) if the
        daemon went away in between."""
        try:
            return action(self.client)
        except ConnectionLost as exc:
            self._reconnect(wait_s)
            if not exc.unsent:  # it may have run part-way: the user decides whether to send it again
                raise Unavailable("the daemon restarted during the answer; connected again, send it again") from None
            return action(self.client)

    def _reconnect(self, wait_s: float) -> None:
        self.client.close()
        if wait_s:
            sys.stderr.write("[the daemon closed the connection; reconnecting]\n")
        deadline = time.monotonic() + wait_s
        while True:
            try:
                self.client = Client(self.sock)
                return
            except Unavailable:
                if time.monotonic() >= deadline:
                    raise Unavailable(f"the daemon did not come back within {wait_s:.0f} s") from None
            try:
                time.sleep(0.3)
            except KeyboardInterrupt:
                raise Unavailable("stopped waiting for the daemon") from None


def _request(args: argparse.Namespace, text: str, first: bool) -> dict[str, Any]:
    messages = []
    if args.system and first:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": text})
    request: dict[str, Any] = {"op": "chat", "messages": messages, "stream": True}
    if args.max_tokens:
        request["max_tokens"] = args.max_tokens
    if args.temperature is not None:
        request["temperature"] = args.temperature
    return request


def stream_answer(client: Client, request: dict[str, Any]) -> str:
    """Print the streamed answer; Ctrl-C cancels it on the daemon. Returns the finish reason."""
    request_id = client.send(request)
    finish = "stop"
    while True:
        try:
            event = client.next_event(request_id)  # not a generator: it must survive a KeyboardInterrupt
        except KeyboardInterrupt:
            with contextlib.suppress(ConnectionLost):  # the daemon is gone: nothing to stop; the next read says so
                client.send({"op": "cancel", "target": request_id})
            continue
        if event["event"] == "token":
            sys.stdout.write(event["text"])
            sys.stdout.flush()
        elif event["event"] == "done":
            finish = event["finish_reason"]
            if event.get("truncated"):
                t = event["truncated"]
                sys.stderr.write(f"\n[context full: the {t['messages']} oldest messages were left out]")
            break
    sys.stdout.write("\n")
    if finish == "cancelled":
        sys.stderr.write("[answer stopped]\n")
    elif finish == "length":
        sys.stderr.write("[answer cut at max_tokens]\n")
    sys.stdout.flush()
    return finish


def read_message(prompt: str = ">>> ") -> str | None:
    """One user message, possibly multi-line; None on end of input."""
    try:
        line = input(prompt)
    except EOFError:
        return None
    if line.strip() == '"""':
        lines = []
        while True:
            try:
                more = input("... ")
            except EOFError:
                break
            if more.strip() == '"""':
                break
            lines.append(more)
        return "\n".join(lines)
    lines = [line]
    while lines[-1].endswith("\\"):
        lines[-1] = lines[-1][:-1]
        try:
            lines.append(input("... "))
        except EOFError:
            break
    return "\n".join(lines)


def _setup_history() -> None:
    try:
        import readline
    except ImportError:  # not on every platform; input() still works
        return
    import atexit

    from edge_llama.config import Config

    path = state_dir(Config()) / "chat_history"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        readline.read_history_file(path)
    except OSError:
        pass
    readline.set_history_length(1000)
    atexit.register(lambda: _save_history(readline, path))


def _save_history(readline: Any, path: Path) -> None:
    try:
        readline.write_history_file(path)
    except OSError:
        pass


def new_session_id() -> str:
    """A session for one interactive conversation (forgotten when the prompt is left)."""
    return "cli-" + secrets.token_hex(6)


def interactive(link: Link, args: argparse.Namespace) -> int:
    _setup_history()
    health = link.run(lambda c: c.call({"op": "health"}))
    print(f"edge-llama chat: {health['model']} ({health['backend']}, KV budget {health['kv_tokens']} tokens). "
          "/help for commands.")
    # Without --session the conversation lives only as long as this prompt: the daemon forgets it on exit.
    session = args.session or new_session_id()
    try:
        return _loop(link, args, session)
    finally:
        if not args.session:
            with contextlib.suppress(EdgeLlamaError, OSError):
                # Leaving must not wait for a daemon that is down; an unforgotten session expires later.
                link.run(lambda c: c.call({"op": "forget", "session": session}), wait_s=0)


def _loop(link: Link, args: argparse.Namespace, session: str) -> int:
    first = True  # the next message opens the conversation (it carries --system)
    while True:
        try:
            text = read_message()
        except KeyboardInterrupt:
            print()
            continue
        if text is None:
            print()
            return 0
        command = text.strip()
        if command in ("/exit", "/quit"):
            return 0
        try:
            first = _handle(link, args, session, command, text, first)
        except EdgeLlamaError as exc:  # the prompt stays: the next message may work (e.g. after a restart)
            print(f"[{exc.code}] {exc.message}", file=sys.stderr)


def _handle(link: Link, args: argparse.Namespace, session: str, command: str, text: str, first: bool) -> bool:
    """One line of input: a command or a message. Returns whether the next message opens the conversation."""
    if not command:
        return first
    if command == "/help":
        print(HELP)
    elif command == "/reset":
        with contextlib.suppress(NotFound):  # nothing stored yet: nothing to forget
            link.run(lambda c: c.call({"op": "forget", "session": session}))
        print("[conversation forgotten; new conversation]")
        return True
    elif command == "/stats":
        stats = link.run(lambda c: c.call({"op": "stats"}))
        t = stats.get("last_timings") or {}
        print(f"requests {sum(stats['requests'].values())}, tokens {stats['tokens']['prompt']} in / "
              f"{stats['tokens']['completion']} out, last: first token {t.get('ttft_ms', '-')} ms, "
              f"{t.get('decode_tok_s', '-')} tok/s")
    elif command.startswith("/"):
        print(f"unknown command {command.split()[0]}; /help lists them")
    else:
        request = _request(args, text, first)
        request["session"] = session
        link.run(lambda c: stream_answer(c, request))
        return False
    return first
