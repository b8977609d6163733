"""`edge-llama wyoming`: serve speech to text, text to speech and the assistant to Home Assistant over the Wyoming
protocol, as a client of the daemon (the daemon never imports this).

    edge-llama wyoming --uri tcp://0.0.0.0:10700 [--socket DAEMON_SOCK] [--zeroconf [NAME]]

The speech models load before anything is served (a missing one is one line and exit 2); the daemon is asked only
when an answer is wanted, so speech works while it starts. Built on wyoming 1.10's AsyncServer.from_uri
(wyoming/server.py): tcp:// and unix:// URIs, one AsyncEventHandler per connection. SIGTERM and SIGINT close the
connections and leave with status 0.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import ipaddress
import logging
import signal
import socket
import sys
from pathlib import Path
from typing import Any

from edge_llama.config import Config, default_socket_path, load_config, with_overrides
from edge_llama.errors import ConfigError, EdgeLlamaError

log = logging.getLogger("edge_llama.wyoming")

ZEROCONF_TYPE = "_wyoming._tcp.local."  # what Home Assistant's wyoming integration browses for


def run_wyoming(args: argparse.Namespace) -> int:
    overrides = {"wyoming.uri": args.uri, "wyoming.zeroconf": args.zeroconf, "voice.asr_model": args.asr_model}
    config = with_overrides(load_config(args.config), overrides)
    sock = Path(args.socket) if args.socket else default_socket_path()
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.INFO, stream=sys.stderr,
                        format="%(levelname)s %(message)s")
    logging.getLogger("faster_whisper").setLevel(logging.WARNING)  # it logs every utterance's duration at INFO
    try:
        import wyoming  # noqa: F401
    except ImportError:
        raise ConfigError("the Wyoming server needs its extra: pip install 'edge-llama[voice,wyoming]'") from None
    from edge_llama.wyoming.services import Services

    services = Services(config, sock)  # loads Whisper and the voice: failures are one line (ModelError)
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(serve(config, services))
    return 0


def _check_unix_path(path: Path) -> None:
    """AsyncUnixServer unlinks whatever is at its path: refuse a live socket (another server, the daemon's) and
    anything that is not a socket; only a stale socket file may go."""
    if not path.exists() and not path.is_symlink():
        return
    if not path.is_socket():
        raise ConfigError(f"wyoming.uri: {path} exists and is not a socket; choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(str(path))
    except ConnectionRefusedError:
        return  # stale: nobody listens
    except OSError as exc:
        raise ConfigError(f"wyoming.uri: cannot check {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise ConfigError(f"wyoming.uri: something already listens on {path}")


async def serve(config: Config, services: Any) -> None:
    from wyoming.server import AsyncServer, AsyncTcpServer, AsyncUnixServer

    from edge_llama.wyoming.handler import Handler

    server = AsyncServer.from_uri(config.wyoming.uri)
    if isinstance(server, AsyncUnixServer):
        _check_unix_path(server.socket_path)
    try:
        await server.start(functools.partial(Handler, services))
    except OSError as exc:
        raise ConfigError(f"cannot listen on {config.wyoming.uri}: {exc.strerror or exc}") from None
    where = config.wyoming.uri
    announcer = None
    if isinstance(server, AsyncTcpServer):
        host, port = server._server.sockets[0].getsockname()[:2]  # type: ignore[union-attr]  # the bound port (0)
        where = f"tcp://{host}:{port}"
        if config.wyoming.zeroconf:
            announcer = await announce(config.wyoming.zeroconf, server.host, port)
    services.refresh()  # the daemon's model, for the first `describe`
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    log.info("ready: Wyoming on %s (asr %s, tts %s, handle by the daemon at %s)", where,
             services.recognizer.name, services.tts.name, services.sock)
    try:
        await stop.wait()
    finally:
        log.info("stopping")
        if announcer is not None:
            await announcer.async_close()
        await server.stop()


async def announce(name: str, host: str, port: int) -> Any:
    """Register the server on mDNS as `name`._wyoming._tcp, as wyoming's own HomeAssistantZeroconf does
    (wyoming/zeroconf.py), but with the address we listen on (that class would announce 0.0.0.0 when given it)
    and a handle to unregister on the way out."""
    try:
        from zeroconf import IPVersion
        from zeroconf.asyncio import AsyncServiceInfo, AsyncZeroconf
    except ImportError:
        raise ConfigError("wyoming.zeroconf needs the zeroconf package: pip install 'edge-llama[wyoming]'") from None
    address = _announced_address(host)
    info = AsyncServiceInfo(ZEROCONF_TYPE, f"{name}.{ZEROCONF_TYPE}", addresses=[socket.inet_aton(address)],
                            port=port)
    zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    try:
        await zc.async_register_service(info)
    except Exception as exc:  # zeroconf's own errors: a name already taken on the network, no interface
        await zc.async_close()
        raise EdgeLlamaError(f"cannot announce {name!r} on mDNS: {exc}") from None
    log.info("announced on mDNS as %s.%s at %s:%d", name, ZEROCONF_TYPE, address, port)
    return zc


def _announced_address(host: str) -> str:
    """The IPv4 address clients should use: the one we listen on, or for a wildcard the one the host routes
    multicast from (wyoming/zeroconf.py's way: a UDP socket 'connected' to the mDNS group)."""
    with contextlib.suppress(ValueError):
        ip = ipaddress.ip_address(host)
        if ip.version == 4 and not ip.is_unspecified:
            return host
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        probe.connect(("224.0.0.251", 5353))
        return str(probe.getsockname()[0])
    except OSError as exc:
        raise EdgeLlamaError(f"wyoming.zeroconf: no IPv4 interface to announce on ({exc.strerror})") from None
    finally:
        probe.close()


def add_parser(sub: Any) -> None:
    """The `wyoming` subcommand (edge_llama/cli.py adds it)."""
    parser = sub.add_parser(
        "wyoming", help="serve speech and the assistant to Home Assistant (Wyoming protocol: asr, tts, handle)",
        description="A Wyoming server for Home Assistant's wyoming integration: speech to text (Whisper), text "
        "to speech (Piper or espeak-ng, streamed sentence by sentence) and conversation (the daemon, one session "
        "per Home Assistant conversation). The voice: section of --config sets the models; wyoming: sets the URI "
        "and limits.", formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="examples:\n  edge-llama wyoming --uri tcp://0.0.0.0:10700 --zeroconf jetson\n"
        "  edge-llama wyoming --uri unix:///run/edge-llama-wyoming/wyoming.sock")
    parser.add_argument("--uri", metavar="URI", help="tcp://HOST:PORT or unix://PATH (default: wyoming.uri, "
                        "tcp://127.0.0.1:10700; Home Assistant on another host needs 0.0.0.0 or the LAN address)")
    parser.add_argument("--socket", metavar="PATH", help=f"daemon socket (default: {default_socket_path()})")
    parser.add_argument("--zeroconf", metavar="NAME", nargs="?", const="edge-llama",
                        help="announce on mDNS so Home Assistant discovers it (default name: edge-llama)")
    parser.add_argument("--config", metavar="FILE", help="YAML config; its voice: and wyoming: sections apply")
    parser.add_argument("--asr-model", metavar="DIR", help="CTranslate2 Whisper folder (default: embedded tiny.en)")
    parser.add_argument("--debug", action="store_true", help="log every connection")
