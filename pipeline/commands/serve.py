r"""Serve retrieval indexes over HTTP, with a page to search them and look at the neighbours and
their plain and SRT feature maps.

    python jobs/serve.py --index out/samples.index                 # http://127.0.0.1:8000
    python jobs/serve.py --index s3://b/feats.index --pretrained --host 0.0.0.0 --port 8080

The API is documented at /docs. New images go through the store's own model, layers, shifts and
image policy (loaded on the first upload), as srt-query runs them; give the weights the store was
made with (--pretrained or --weights; random-init stores reuse their seed).
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys

from pipeline.commands import CommandParser, add_store_flags, log_to_stderr

LOCAL_HOSTS = ("127.0.0.1", "localhost", "::1")


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(description=__doc__)
    parser.add_argument("--index", action="append", required=True, help="index folder URI built by srt-index (repeatable: one service, several indexes)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s, this machine only)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--max-upload-mb", type=float, default=20.0, help="largest uploaded image in MB; its pixels are bounded by the store's --max-pixels (default: %(default)s)")
    parser.add_argument("--max-concurrent", type=int, default=8, help="uploaded images waiting for the model at once; more are answered 503 (default: %(default)s)")
    add_store_flags(parser, layer=False, weights_for="for uploaded images and feature pictures")
    return parser


def main(argv: list[str] | None = None) -> int:
    log_to_stderr()
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.max_upload_mb <= 0:
        parser.error(f"--max-upload-mb: must be positive, got {args.max_upload_mb}")
    if args.max_concurrent < 1:
        parser.error(f"--max-concurrent: must be a positive integer, got {args.max_concurrent}")
    if not 0 < args.port < 65536:
        parser.error(f"--port: must be in 1..65535, got {args.port}")
    import uvicorn

    from pipeline.commands.service.app import create_app
    from pipeline.commands.service.catalog import Catalog

    try:
        catalog = Catalog(args.index, storage_options=args.storage_options, pretrained=args.pretrained, weights=args.weights)
    except (ValueError, FileNotFoundError, KeyError) as error:
        parser.error(f"--index: {error}")
    if args.host not in LOCAL_HOSTS:
        logging.getLogger("srt").warning("listening on %s: reachable from other machines; whoever reaches it can search these indexes and see their images", args.host)
    app = create_app(catalog, max_upload_bytes=int(args.max_upload_mb * (1 << 20)), max_concurrent=args.max_concurrent)
    gc.collect()
    gc.freeze()  # the indexes' lookups (millions of objects) stay out of every later collection: no 100 ms pauses
    print(f"serving     {', '.join(catalog.served)} at http://{args.host}:{args.port}/ (API docs at /docs)", flush=True)

    uvicorn.run(app, host=args.host, port=args.port, log_level="warning")
    return 0


if __name__ == "__main__":
    sys.exit(main())
