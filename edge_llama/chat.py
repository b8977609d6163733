"""`edge-llama chat`: one-shot answers and the interactive prompt.

Interactive mode keeps the conversation in a daemon session, streams answers as they are generated, reads
multi-line input (a line ending in a backslash continues; a line of three double quotes opens and closes a
block), keeps input history (readline), and treats Ctrl-C during an answer as "stop this answer" (the daemon is
sent a `cancel`), at the prompt as "clear the line"; Ctrl-D or /exit leaves.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
from pathlib import Path
from typing import Any

from edge_llama.client import Client
from edge_llama.config import state_dir
from edge_llama.errors import BadRequest, EdgeLlamaError

HELP = """commands:
  /reset   forget this conversation          /stats   daemon statistics
  /exit    leave (or Ctrl-D)                 /help    this text
input: end a line with \\ to continue it; a line with only \"\"\" opens and closes a multi-line block.
Ctrl-C stops the answer being written."""


def run_chat(sock: Path, args: argparse.Namespace) -> int:
    with Client(sock) as client:
        if args.message is not None or not sys.stdin.isatty():
            text = args.message if args.message is not None else sys.stdin.read()
            if not text.strip():
                raise BadRequest("nothing to send: the message is empty")
            request = _request(args, text, first=True)
            if args.session:
                request["session"] = args.session
            finish = stream_answer(client, request)
            return 0 if finish != "cancelled" else 130
        return interactive(client, args)


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


def interactive(client: Client, args: argparse.Namespace) -> int:
    from edge_llama.cli import new_session_id

    _setup_history()
    health = client.call({"op": "health"})
    print(f"edge-llama chat: {health['model']} ({health['backend']}, KV budget {health['kv_tokens']} tokens). "
          "/help for commands.")
    # Without --session the conversation lives only as long as this prompt: the daemon forgets it on exit.
    session = args.session or new_session_id()
    try:
        return _loop(client, args, session)
    finally:
        if not args.session:
            with contextlib.suppress(EdgeLlamaError, OSError):
                client.call({"op": "forget", "session": session})


def _loop(client: Client, args: argparse.Namespace, session: str) -> int:
    first = True
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
        if not command:
            continue
        if command in ("/exit", "/quit"):
            return 0
        if command == "/help":
            print(HELP)
            continue
        if command == "/reset":
            client.call({"op": "forget", "session": session})
            first = True
            print("[conversation forgotten; new conversation]")
            continue
        if command == "/stats":
            stats = client.call({"op": "stats"})
            t = stats.get("last_timings") or {}
            print(f"requests {sum(stats['requests'].values())}, tokens {stats['tokens']['prompt']} in / "
                  f"{stats['tokens']['completion']} out, last: first token {t.get('ttft_ms', '-')} ms, "
                  f"{t.get('decode_tok_s', '-')} tok/s")
            continue
        if command.startswith("/"):
            print(f"unknown command {command.split()[0]}; /help lists them")
            continue
        request = _request(args, text, first)
        request["session"] = session
        try:
            stream_answer(client, request)
            first = False
        except EdgeLlamaError as exc:
            print(f"[{exc.code}] {exc.message}", file=sys.stderr)
