"""`edge-llama` command line: serve, chat, summarize, status.

Every failure is one line on stderr starting with "edge-llama:" and a non-zero exit (2 usage/config/model,
3 daemon not reachable, 1 anything else); no tracebacks for errors we know.
"""

from __future__ import annotations

import argparse
import logging
import os
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
  edge-llama plan --device orin-nano-8gb        # memory plan + trtllm-build flags for Llama-3.2-1B
  edge-llama quantize --model Llama-3.2-1B-Instruct --out llama-1b-awq
  edge-llama build --checkpoint llama-1b-awq --plan plan.json --out llama-1b-engine   # on the Jetson
  edge-llama doctor --smoke                     # on-device preflight: what works, what to fix (exit 1 if not)
  edge-llama voice                              # talk to it: microphone -> Whisper -> daemon -> speech
  edge-llama voice --input-wav question.wav --output-wav answer.wav
  edge-llama transcribe recording.wav           # speech to text with the embedded Whisper tiny.en
  edge-llama wyoming --uri tcp://0.0.0.0:10700  # speech and the assistant for Home Assistant (Wyoming)

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
    serve.add_argument("--model", metavar="GGUF|ENGINE_DIR",
                       help="GGUF file (llamacpp; default: the embedded SmolLM2-135M-Instruct) "
                       "or engine folder (trtllm)")
    serve.add_argument("--backend", choices=["llamacpp", "trtllm", "fake"], help="engine backend (default: llamacpp)")
    serve.add_argument("--kv-tokens", type=int, metavar="N", help="KV budget in tokens: prompt + reply <= N")
    serve.add_argument("--log-level", choices=["debug", "info", "warning", "error"])

    chat = sub.add_parser("chat", help="talk to the daemon (interactive, or one answer with -m / stdin)",
                          description="Interactive chat when stdin is a terminal: multi-line input (end a line "
                          "with \\ to continue), history, Ctrl-C cancels the answer, /reset /stats /exit. "
                          "With -m TEXT, or text on stdin, prints one streamed answer.")
    socket_arg(chat)
    chat.add_argument("-m", "--message", metavar="TEXT", help="send one message, print the answer, exit")
    chat.add_argument("--session", metavar="ID", help="keep the conversation in this daemon session (it stays "
                      "after you leave; without --session the interactive prompt's conversation is forgotten on "
                      "exit)")
    chat.add_argument("--system", metavar="TEXT", help="system prompt for this conversation")
    chat.add_argument("--max-tokens", type=int, metavar="N", help="reply length limit in tokens")
    chat.add_argument("--temperature", type=float, metavar="T")

    summ = sub.add_parser("summarize", help="summarize a file (any length) or stdin",
                          description="Summarize text of any length: the daemon splits it to fit its KV budget.")
    socket_arg(summ)
    summ.add_argument("file", metavar="FILE|-", help="text file, or - for stdin")
    summ.add_argument("--style", choices=["paragraph", "bullets"], default="paragraph")
    summ.add_argument("--max-tokens", type=int, metavar="N", help="length limit of the summary in tokens")

    quant = sub.add_parser(
        "quantize", help="HF Llama checkpoint -> INT4-AWQ TensorRT-LLM checkpoint (nvidia-modelopt)",
        description="Quantize a Hugging Face Llama checkpoint to INT4-AWQ with nvidia-modelopt (awq_lite) and "
        "export a TensorRT-LLM checkpoint with manifest.json. Uses CUDA when present, else the CPU (slow: minutes "
        "for a 1B model). Example: edge-llama quantize --model Llama-3.2-1B-Instruct --out llama-1b-awq")
    quant.add_argument("--model", required=True, type=Path, metavar="HF_DIR", help="Hugging Face checkpoint folder")
    quant.add_argument("--out", required=True, type=Path, metavar="DIR", help="output folder")
    quant.add_argument("--block-size", type=int, default=128,
                       help="AWQ group size; must divide every layer width (Llama-3.2-1B: 128; SmolLM2: 64)")
    quant.add_argument("--calib", default="builtin", metavar="FILE|builtin",
                       help="calibration text (default: a built-in corpus shipped with edge-llama)")
    quant.add_argument("--calib-size", type=int, default=32, metavar="N", help="calibration sequences")
    quant.add_argument("--calib-seq-len", type=int, default=512, metavar="TOKENS", help="tokens per sequence")
    quant.add_argument("--kv-int8", action="store_true", help="also calibrate an INT8 KV cache (halves KV memory)")
    quant.add_argument("--alpha-step", type=float, default=0.05, metavar="STEP",
                       help="grid step of AWQ's scale search over alpha in [0, 1] (default 0.05; 0.1 halves the "
                       "search time at slightly higher error)")
    quant.add_argument("--no-clip", dest="clip", action="store_false",
                       help="skip AWQ's per-group weight-clip search (on by default; it takes seconds and lowers "
                       "the INT4 error)")
    quant.add_argument("--lm-head", choices=["fp16", "int8", "int4"], default="fp16",
                       help="lm_head precision: fp16 (default), int4 (AWQ like the other layers; the largest term "
                       "in bytes read per token), int8 (refused: TensorRT-LLM 0.12 cannot load it, the error says why)")
    quant.add_argument("--device", choices=["auto", "cuda", "cpu"], default="auto")
    quant.add_argument("--force", action="store_true", help="overwrite a non-empty --out")

    plan = sub.add_parser("plan", help="memory plan and trtllm-build flags for a Jetson",
                          description="Size an INT4-AWQ engine for a Jetson: weights, activations, KV budget, "
                          "resident memory and decode ceiling, each with its derivation.")
    plan.add_argument("--device", required=True, metavar="NAME", help="orin-nano-8gb, orin-nano-super, "
                      "orin-nx-16gb, agx-orin-32gb, agx-orin-64gb, thor")
    plan.add_argument("--model", default="llama-3.2-1b", metavar="CONFIG|preset",
                      help="preset llama-3.2-1b (default), a config.json, or a checkpoint folder")
    plan.add_argument("--memory-budget", type=float, metavar="GiB", help="memory for edge-llama (default: device "
                      "memory minus the OS reserve)")
    plan.add_argument("--group-size", type=int, default=128)
    plan.add_argument("--kv-dtype", choices=["fp16", "int8"], default="fp16",
                      help="int8 halves the KV cache but TensorRT-LLM 0.12 then builds without paged context FMHA: "
                      "no chunked context, no KV block reuse (the plan says what it costs)")
    plan.add_argument("--lm-head", choices=["fp16", "int8", "int4"], default="fp16",
                      help="lm_head precision of the checkpoint (`edge-llama quantize --lm-head`); the plan prints "
                      "the decode ceiling of each choice")
    plan.add_argument("--max-seq-len", type=int, default=4096, metavar="TOKENS")
    plan.add_argument("--max-batch", type=int, default=1)
    plan.add_argument("--max-num-tokens", type=int, default=512, metavar="TOKENS",
                      help="tokens per engine step (sets activation memory)")
    plan.add_argument("--max-draft-len", type=int, default=0, metavar="N",
                      help="build for prompt-lookup drafts of up to N tokens (TensorRT-LLM draft_tokens_external; "
                      "greedy replies only; 0 = off)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON (input of `edge-llama build`)")

    bld = sub.add_parser("build", help="run trtllm-build with a plan (on the Jetson)",
                         description="Build the TensorRT-LLM engine on the device that will run it.")
    bld.add_argument("--checkpoint", required=True, type=Path, metavar="DIR", help="from `edge-llama quantize`")
    bld.add_argument("--plan", required=True, type=Path, metavar="PLAN", help="from `edge-llama plan --json`")
    bld.add_argument("--out", required=True, type=Path, metavar="ENGINE_DIR")
    bld.add_argument("--force", action="store_true", help="overwrite a non-empty --out")

    status = sub.add_parser("status", help="show whether the daemon runs, its model, KV budget and counters")
    socket_arg(status)
    status.add_argument("--json", action="store_true", help="print the raw stats object")

    doctor = sub.add_parser(
        "doctor", help="on-device preflight: platform, engine, GPU access, memory, socket, daemon",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Check what serving needs, one row per check (ok / warn / fail / skip), each failure with how "
        "to fix it: L4T/JetPack, the Jetson model and its device profile, Python, TensorRT-LLM/TensorRT/CUDA "
        "against the engine manifest (or llama.cpp and its GPU offload), the engine's file hashes, GPU device nodes "
        "against the unit's DeviceAllow=, memory and swap against the plan, power mode, thermal zones, the socket "
        "and its allowlist, the daemon's health. Exit status 1 when something needed to serve fails, else 0.",
        epilog="examples:\n  sudo edge-llama doctor                        # the installed service's config, socket\n"
        "  edge-llama doctor --smoke --plan plan.json    # + one short generation, tok/s against the plan\n"
        "  edge-llama doctor --json | jq '.checks[] | select(.status == \"fail\")'")
    doctor.add_argument("--config", metavar="FILE", help="config to check (default: the one the installed service "
                        "reads, /etc/edge-llama/config.yaml, else the built-in defaults)")
    socket_arg(doctor)
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    doctor.add_argument("--smoke", action="store_true", help="also run one short generation through the socket")
    doctor.add_argument("--plan", metavar="PLAN", help="`edge-llama plan --json` output: resident memory, build "
                        "peak and decode ceiling to check against")
    doctor.add_argument("--timeout", type=float, default=30.0, metavar="S", help="wait this long for the daemon's "
                        "health answer (a socket-activated start loads the model first; default 30)")
    doctor.add_argument("--root", metavar="DIR", default="/", help="for testing: read /etc, /proc, /sys, /dev, "
                        "/usr/local/cuda and /var/lib under DIR (default /)")

    voice = sub.add_parser(
        "voice", help="spoken assistant: microphone -> Whisper -> daemon -> speech, with barge-in",
        description="Listen on the microphone (Silero VAD ends each utterance), transcribe with Whisper, ask the "
        "daemon in a session and speak the answer while it is generated (Piper or espeak-ng). Talking over the "
        "answer interrupts it. The voice: section of --config sets models, devices and timings. /exit or Ctrl-C "
        "leaves.", epilog="examples:\n  edge-llama voice --list-devices\n  edge-llama voice --wake 'hey jetson'\n"
        "  edge-llama voice --ptt --input-device 'USB Audio'\n"
        "  edge-llama voice --input-wav question.wav --output-wav answer.wav",
        formatter_class=argparse.RawDescriptionHelpFormatter)
    voice.add_argument("--config", metavar="FILE", help="YAML config; its voice: section applies")
    socket_arg(voice)
    voice.add_argument("--session", metavar="ID", help="continue this daemon session (kept after leaving)")
    voice.add_argument("--ptt", action="store_true", help="push to talk: hold Enter while speaking (a tap "
                       "starts, the next Enter ends)")
    voice.add_argument("--wake", metavar="PHRASE", help="answer only utterances that start with PHRASE")
    voice.add_argument("--input-device", metavar="NAME|INDEX", help="microphone (default: the system's)")
    voice.add_argument("--output-device", metavar="NAME|INDEX", help="speaker (default: the system's)")
    voice.add_argument("--input-wav", metavar="FILE", help="hear this WAV file instead of the microphone")
    voice.add_argument("--output-wav", metavar="FILE", help="speak into this WAV file instead of the speaker "
                       "(with --input-wav: on the file's own clock, as fast as the machine goes)")
    voice.add_argument("--asr-model", metavar="DIR", help="CTranslate2 Whisper folder (default: embedded tiny.en)")
    voice.add_argument("--list-devices", action="store_true", help="list audio devices and exit")

    transcribe = sub.add_parser("transcribe", help="speech to text of a WAV file (Whisper, offline)",
                                description="Print the transcript of a PCM WAV file (any rate from 8 kHz, any "
                                "length) with the embedded Whisper tiny.en or voice.asr_model.")
    transcribe.add_argument("file", metavar="FILE.wav")
    transcribe.add_argument("--config", metavar="FILE", help="YAML config; its voice: section applies")
    transcribe.add_argument("--asr-model", metavar="DIR", help="CTranslate2 Whisper folder")
    from edge_llama.wyoming.server import add_parser as add_wyoming_parser

    add_wyoming_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "serve":
            return cmd_serve(args)
        if args.command in ("quantize", "plan", "build"):
            return cmd_pipeline(args)
        if args.command == "doctor":
            from edge_llama.doctor import run_doctor

            return run_doctor(args)
        if args.command in ("voice", "transcribe"):
            from edge_llama.voice.cli import run_transcribe, run_voice

            return run_voice(args) if args.command == "voice" else run_transcribe(args)
        if args.command == "wyoming":
            from edge_llama.wyoming.server import run_wyoming

            return run_wyoming(args)
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


def cmd_pipeline(args: argparse.Namespace) -> int:
    if args.command == "quantize":
        from edge_llama.pipeline.quantize import QuantizeOptions, quantize

        manifest = quantize(QuantizeOptions(
            model=args.model, out=args.out, block_size=args.block_size, calib=args.calib,
            calib_size=args.calib_size, calib_seq_len=args.calib_seq_len, kv_int8=args.kv_int8,
            alpha_step=args.alpha_step, clip=args.clip, lm_head=args.lm_head, device=args.device, force=args.force))
        print(manifest)
        return 0
    if args.command == "plan":
        import json

        from edge_llama.pipeline.plan import PlanOptions, format_plan, plan

        result = plan(PlanOptions(device=args.device, model=args.model, memory_budget_gib=args.memory_budget,
                                  group_size=args.group_size, kv_dtype=args.kv_dtype, max_batch=args.max_batch,
                                  max_seq_len=args.max_seq_len, max_num_tokens=args.max_num_tokens,
                                  lm_head=args.lm_head, max_draft_len=args.max_draft_len))
        print(json.dumps(result, indent=2) if args.json else format_plan(result))
        return 0
    from edge_llama.pipeline.build import build

    print(build(args.checkpoint, args.plan, args.out, force=args.force))
    return 0


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
    cache = stats.get("prompt_cache")
    if cache is not None:
        print(f"  cache      {cache['bytes'] / 2**20:.1f} of {cache['limit_bytes'] / 2**20:.0f} MiB, "
              f"{cache['states']} states; saves {cache['saves']}, evictions {cache['evictions']}, restores "
              f"{cache['restores']} (spared {cache['restored_tokens']} prompt tokens)")
    print(f"  uptime     {stats['uptime_s']} s")
    return 0
