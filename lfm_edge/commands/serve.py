"""`lfm-edge serve -m MODEL`: an OpenAI- and ollama-compatible HTTP server (see lfm_edge/server/)."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from pathlib import Path

from ..hub import DEFAULT_MODEL
from ..server import bind_warning, listen, make_server
from .common import add_model_args, integer, load_model, non_negative_int, positive_int

API_KEY_ENV = "LFM_EDGE_API_KEY"


def configure_parser(p: argparse.ArgumentParser) -> None:
    add_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=port_number, default=8080, help="port to listen on (default 8080; 0: any free port)")
    p.add_argument("--api-key", default=os.environ.get(API_KEY_ENV) or None, metavar="KEY",
                   help=f"require this key of every request but /health ('Authorization: Bearer KEY'); "
                        f"default: ${API_KEY_ENV}")
    p.add_argument("-np", "--parallel", type=positive_int, default=4, metavar="N",
                   help="requests decoded together, each with its own cache (default 4)")
    p.add_argument("--max-queue", type=non_negative_int, default=16, metavar="N",
                   help="requests that may wait beyond those; more get a 503 with Retry-After (default 16)")
    p.add_argument("--allowed-hosts", type=name_list, action="extend", default=[], metavar="NAMES",
                   help="more host names requests may be addressed to (comma-separated; '*': any). By default "
                        "a request's Host must be the address listened on or a loopback name (localhost, "
                        "127.0.0.1, ::1); with --host 0.0.0.0 also any IP address and this machine's host name. "
                        "Others get a 403, so a web page cannot reach the server by DNS rebinding")
    p.add_argument("--cors", type=name_list, action="extend", default=[], metavar="ORIGIN",
                   help="let web pages from ORIGIN (e.g. http://localhost:3000; comma-separated; '*': any) call "
                        "the server from a browser: their preflight requests are answered and the replies carry "
                        "Access-Control-Allow-Origin. Default: no CORS headers, so browsers keep pages out")
    p.add_argument("-q", "--quiet", action="store_true", help="do not log each request")


def model_id(ref: str | None) -> str:
    """What /v1/models calls the model: a file's stem, or the hub reference as given."""
    ref = ref or DEFAULT_MODEL
    path = Path(os.path.expanduser(ref))
    return path.stem if path.exists() or ref.endswith(".gguf") else ref


def port_number(text: str) -> int:
    value = integer(text)
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be from 0 to 65535 (0: any free port), got {value}")
    return value


def name_list(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give one or more names, separated by commas")
    return names


def stop_on_sigterm(signum, frame) -> None:
    raise KeyboardInterrupt  # shut down as on Ctrl-C


def main(args: argparse.Namespace) -> int:
    logging.basicConfig(
        level=logging.WARNING if args.quiet else logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S"
    )
    # a busy port is reported now, not after a long load
    listener = listen(args.host, args.port, api_key=args.api_key, allowed_hosts=args.allowed_hosts, cors=args.cors)
    try:
        llm = load_model(args)
    except BaseException:
        listener.server_close()
        raise
    server = make_server(llm, host=args.host, port=args.port, model_id=model_id(args.model), listener=listener,
                         parallel=args.parallel, max_queued=args.max_queue)
    warning = bind_warning(args.host, args.api_key)
    if warning:
        print(f"lfm-edge: {warning}", file=sys.stderr)
    signal.signal(signal.SIGTERM, stop_on_sigterm)
    print(f"lfm-edge: serving {server.engine.model_id} at {server.url} (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    print("lfm-edge: stopped", file=sys.stderr)
    return 0
