"""`edge-llama` command line: serve, chat, summarize, status.

Every failure is one line on stderr starting with "edge-llama:" and a non-zero exit (2 usage/config/model,
3 daemon not reachable, 1 anything else); no tracebacks for errors we know.
"""

from __future__ import annotations

import argparse
import logging
import os
import secrets
import sys
from pathlib import Path
from typing import Any

from edge_llama import __version__
from edge_llama.config import default_socket_path, load_config, socket_path, with_overrides
from edge_llama.errors import EdgeLlamaError

EPILOG = """\
examples:
  edge-llama serve                              # the embedded SmolLM2-135M on the CPU, default socket
  edge-llama serve --model llama-3.2-1b-q4_k_m.gguf --kv-tokens 4096
  edge-llama chat                               # interactive; /help inside
  edge-llama chat -m "What is a KV cache?"      # one answer, streamed to stdout
  echo "Translate to French: good morning" | edge-llama chat
  edge-llama summarize report.txt --style bullets
  edge-llama status

The socket is --socket, else $EDGE_LLAMA_SOCKET, else /run/edge-llama/edge-llama.sock under systemd,
else $XDG_RUNTIME_DIR/edge-llama/edge-llama.sock (or /tmp/edge-llama-$UID/edge-llama.sock).
"""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="edge-llama", description="On-device LLM assistant: a chat and summarization daemon on a Unix socket.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"edge-llama {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def socket_arg(p: argparse.ArgumentParser) -> None:
        p.add_argument("--socket", metavar="PATH", help=f"daemon socket (default: {default_socket_path()})")

    serve = sub.add_parser("serve", help="run the daemon in the foreground (SIGTERM/Ctrl-C stops it cleanly)",
                           description="Load the model and serve protocol v1 on a Unix socket until SIGTERM.")
    serve.add_argument("--config", metavar="FILE", help="YAML config file (default: built-in defaults)")
    socket_arg(serve)
    serve.add_argument("--state-dir", metavar="DIR", help="where sessions are kept")
    serve.add_argument("--model", metavar="GGUF", help="model file (default: the embedded SmolLM2-135M-Instruct)")
    serve.add_argument("--backend", choices=["llamacpp", "fake"], help="engine backend (default: llamacpp)")
    serve.add_argument("--kv-tokens", type=int, metavar="N", help="KV budget in tokens: prompt + reply <= N")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    chat = sub.add_parser("chat", help="talk to the daemon (interactive, or one answer with -m / stdin)",
                          description="Interactive chat when stdin is a terminal: multi-line input (end a line "
                          "with \\ to continue), history, Ctrl-C cancels the answer, /reset /stats /exit. "
                          "With -m TEXT, or text on stdin, prints one streamed answer.")
    socket_arg(chat)
    chat.add_argument("-m", "--message", metavar="TEXT", help="send one message, print the answer, exit")
    chat.add_argument("--session", metavar="ID", help="keep the conversation in this daemon session")
    chat.add_argument("--system", metavar="TEXT", help="system prompt for this conversation")
    chat.add_argument("--max-tokens", type=int, metavar="N", help="reply length limit in tokens")
    chat.add_argument("--temperature", type=float, metavar="T")

    summ = sub.add_parser("summarize", help="summarize a file (any length) or stdin",
                          description="Summarize text of any length: the daemon splits it to fit its KV budget.")
    socket_arg(summ)
    summ.add_argument("file", metavar="FILE|-", help="text file, or - for stdin")
    summ.add_argument("--style", choices=["paragraph", "bullets"], default="paragraph")
    summ.add_argument("--max-tokens", type=int, metavar="N", help="length limit of the summary in tokens")

    status = sub.add_parser("status", help="show whether the daemon runs, its model, KV budget and counters")
    socket_arg(status)
    status.add_argument("--json", action="store_true", help="print the raw stats object")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        sock = Path(args.socket) if args.socket else default_socket_path()
        if args.command == "chat":
            from edge_llama.chat import run_chat

            return run_chat(sock, args)
        if args.command == "summarize":
            return cmd_summarize(sock, args)
        return cmd_status(sock, args)
    except EdgeLlamaError as exc:
        print(f"edge-llama: {exc.message}", file=sys.stderr)
        return exc.exit_code
    except BrokenPipeError:  # `edge-llama chat -m ... | head`
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1


def cmd_serve(args: argparse.Namespace) -> int:
    overrides: dict[str, Any] = {
        "server.socket": args.socket, "server.state_dir": args.state_dir, "engine.model": args.model,
        "engine.backend": args.backend, "engine.kv_tokens": args.kv_tokens, "log_level": args.log_level,
    }
    config = with_overrides(load_config(args.config), overrides)
    from edge_llama.service.daemon import serve
    from edge_llama.service.systemd import setup_logging

    setup_logging(config.log_level)
    logging.getLogger("edge_llama").info("starting (socket %s)", socket_path(config))
    return serve(config, args.config, overrides)


def cmd_summarize(sock: Path, args: argparse.Namespace) -> int:
    from edge_llama.client import Client

    try:
        text = sys.stdin.read() if args.file == "-" else Path(args.file).read_text(encoding="utf-8")
    except OSError as exc:
        raise EdgeLlamaError(f"cannot read {args.file}: {exc.strerror}") from exc
    except UnicodeDecodeError:
        raise EdgeLlamaError(f"{args.file} is not UTF-8 text") from None
    request: dict[str, Any] = {"op": "summarize", "text": text, "style": args.style, "stream": True}
    if args.max_tokens:
        request["max_tokens"] = args.max_tokens
    show_progress = sys.stderr.isatty()
    with Client(sock) as client:
        for event in client.events(client.send(request)):
            if event["event"] == "token":
                sys.stdout.write(event["text"])
                sys.stdout.flush()
            elif event["event"] == "progress" and show_progress:
                sys.stderr.write(f"\r[{event['done']}/{event['total']} parts]")
                sys.stderr.flush()
    if show_progress:
        sys.stderr.write("\r" + " " * 24 + "\r")
    sys.stdout.write("\n")
    return 0


def cmd_status(sock: Path, args: argparse.Namespace) -> int:
    import json

    from edge_llama.client import Client

    with Client(sock, timeout=10) as client:
        stats = client.call({"op": "stats"})
    if args.json:
        print(json.dumps(stats, indent=2))
        return 0
    q = stats["queue"]
    print(f"edge-llama {stats['version']}: {stats['state']} on {sock}")
    print(f"  model      {stats['model']} ({stats['backend']} backend, template {stats['template']})")
    print(f"  KV budget  {stats['kv_tokens']} tokens (model max {stats['max_seq_len']})")
    print(f"  queue      {q['admitted']} admitted, {q['waiting']} waiting, limit {q['limit']}")
    print(f"  requests   {sum(stats['requests'].values())}  errors {sum(stats['errors'].values())}  "
          f"tokens {stats['tokens']['prompt']} in / {stats['tokens']['completion']} out")
    if stats["last_timings"]:
        t = stats["last_timings"]
        print(f"  last       queue {t['queue_ms']} ms, first token {t['ttft_ms']} ms, {t['decode_tok_s']} tok/s")
    print(f"  uptime     {stats['uptime_s']} s")
    return 0


def new_session_id() -> str:
    return "cli-" + secrets.token_hex(6)
