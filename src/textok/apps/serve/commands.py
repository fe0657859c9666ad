"""The ``textok serve`` verb: load the models, warm up, print the address, serve until Ctrl-C or SIGTERM.

The requests in flight finish first; then the signal goes on to the CLI, which exits 130 / 143 like every
verb.
"""

from __future__ import annotations

import argparse
import sys

from ...config import port_number
from .app import ServeApp
from .guard import is_loopback
from .server import make_server


def serve_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", action="append", default=[], metavar="DIR",
                   help="a tokenizer directory (save_pretrained / a run's final/); repeat to compare several")
    p.add_argument("--generator", action="append", default=[], metavar="DIR",
                   help="a generator directory (train-generator's final/) to sample from; repeat it for one per "
                        "tokenizer: the page shows each one's samples beside the tokenizer it decodes with")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: this machine only)")
    p.add_argument("--port", type=port_number, default=7860, help="port (0 = any free port)")
    p.add_argument("--verbose", action="store_true", help="log every request")


def cmd_serve(args: argparse.Namespace) -> int:
    local = is_loopback(args.host)
    if not local:
        print(f"textok serve: warning: listening on {args.host} exposes the page to other machines; "
              "loading models by path from the page is off", file=sys.stderr)
    app = ServeApp(args.model, args.generator, allow_model_paths=local)
    for m in app.models:
        print(f"  {m.directory}: {'error: ' + m.error if m.error else 'loaded'}", flush=True)
    for g in app.generators:
        print(f"  generator {g.directory}: {'error: ' + g.error if g.error else 'loaded'}", flush=True)
    app.warm_up()
    server = make_server(app, args.host, args.port, verbose=args.verbose)
    print(f"textok serve: ready at {server.url} (Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0
