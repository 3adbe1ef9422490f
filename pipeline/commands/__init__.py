"""The command-line jobs, installed as console scripts (pyproject.toml); jobs/*.py run the same
code from a checkout and under `ray job submit`.

    srt --version          the package version and its commands

One module per command, each a thin layer: parse flags, call the library, print. Shared here:
the flags of commands that read a store, the parser of training jobs.

May import: every package of the pipeline; nothing imports it but `jobs/*.py` and the scripts.
"""

from __future__ import annotations

import argparse
import json
import logging
from importlib.metadata import PackageNotFoundError, version
from typing import NoReturn

from pipeline import __version__

COMMANDS = {
    "srt-extract": "extract SRT features of an image dataset into a Zarr store (jobs/extract.py)",
    "srt-index": "build or extend a FAISS retrieval index from a store (jobs/build_index.py)",
    "srt-query": "query an index by stored image or new image files (jobs/query.py)",
    "srt-eval-retrieval": "mAP and recall of stores on a retrieval ground truth (jobs/eval_retrieval.py)",
    "srt-visualize": "picture plain and SRT feature maps (jobs/visualize.py)",
    "srt-propagate": "DAVIS label propagation from a store, or scoring a results folder (jobs/propagate.py)",
    "srt-saliency": "TokenCut salient regions from a store, with maxF and IoU (jobs/saliency.py)",
    "srt-distill": "self-distil a student toward a store's SRT features (jobs/distill.py)",
    "srt-probe": "linear depth or segmentation probes on stores, side by side (jobs/probe.py)",
    "srt-discover": "single-object boxes by TokenCut or LOST from a store, with CorLoc (jobs/discover.py)",
    "srt-serve": "search indexes in a browser: neighbours and feature pictures over HTTP (jobs/serve.py)",
}


class CommandParser(argparse.ArgumentParser):
    """The parser of every command: a bad flag is answered in one line, the error and a pointer to
    --help (not the whole usage first), and flags are never abbreviated (`--strid 8` is no `--stride`)."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(allow_abbrev=False, formatter_class=argparse.RawDescriptionHelpFormatter, **kwargs)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def log_to_stderr() -> None:
    """The project's messages (logger "srt") at INFO; other libraries' (faiss's loader, ...) only
    when they warn."""
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("srt").setLevel(logging.INFO)


def add_store_flags(parser: argparse.ArgumentParser, *, layer: bool = True, weights_for: str | None = None) -> None:
    """The flags of commands that read a store: its --layer, the weights it was extracted with
    (when the command runs its model, `weights_for` saying why), and --storage-options."""
    if layer:
        parser.add_argument("--layer", type=int, default=None, help="stored layer (default: the store's only layer)")
    if weights_for:
        parser.add_argument("--pretrained", action="store_true", help=f"the store was extracted with timm's pretrained weights: load them {weights_for}")
        parser.add_argument("--weights", default=None, help=f"the store's checkpoint URI, {weights_for}")
    parser.add_argument("--storage-options", type=json.loads, default={}, help="JSON of fsspec storage options")


def training_parser(description: str | None, config_type: type) -> argparse.ArgumentParser:
    """The flags of a job that trains on a store (distillation, probes): its config's, --config, --local."""
    from pipeline.extraction.flags import CONFIG_FILE_HELP, add_arguments

    parser = CommandParser(description=description)
    add_arguments(parser, config_type)
    parser.add_argument("--config", help=CONFIG_FILE_HELP)
    parser.add_argument("--local", action="store_true", help="train in this process, without Ray")
    return parser


def installed_version() -> str:
    try:
        return version("srt-pipeline")
    except PackageNotFoundError:  # a checkout run without installing
        return __version__


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(
        prog="srt",
        description="SRT feature pipeline. Commands:\n" + "\n".join(f"  {name:<20} {what}" for name, what in COMMANDS.items()),
    )
    parser.add_argument("--version", action="version", version=f"srt-pipeline {installed_version()}")
    parser.parse_args(argv)
    parser.print_help()
    return 0
