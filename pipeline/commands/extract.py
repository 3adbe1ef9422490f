r"""Extract SRT features of an image dataset into a Zarr store with a Parquet manifest.

    python jobs/extract.py --dataset data/samples --out out/samples.zarr      # local Ray instance
    ray job submit --working-dir . -- python jobs/extract.py --dataset s3://bucket/images \
        --out s3://bucket/feats.zarr --pretrained                                # a Ray cluster
    python jobs/extract.py ... --local                                           # no Ray at all

A rerun against the same --out resumes: only shards without a manifest part are computed.
A rerun with --append also lists --dataset again and extracts what was added to it since.
"""

from __future__ import annotations

import argparse
import logging
import sys

from pipeline.commands import CommandParser, log_to_stderr
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.distributed import run_ray
from pipeline.extraction.flags import CONFIG_FILE_HELP, ConfigError, add_arguments, from_args, parse_with_config_file
from pipeline.extraction.listing import SourceError
from pipeline.extraction.runner import interrupted_note, run_local
from pipeline.store.layout import StoreMismatchError


def build_parser() -> argparse.ArgumentParser:
    parser = CommandParser(description=__doc__)
    add_arguments(parser, ExtractConfig)
    parser.add_argument("--config", help=CONFIG_FILE_HELP)
    parser.add_argument("--local", action="store_true", help="run in this process, without Ray")
    parser.add_argument("--verbose", action="store_true", help="log every flag at start, and Ray's own start-up messages")
    return parser


def main(argv: list[str] | None = None) -> int:
    log_to_stderr()
    parser = build_parser()
    config: ExtractConfig | None = None  # until the flags are parsed, an interrupt has nothing to report on
    try:
        args = parse_with_config_file(parser, argv, ExtractConfig)
        if args.verbose:
            logging.getLogger("srt").setLevel(logging.DEBUG)
        config = from_args(args, ExtractConfig)
        summary = run_local(config) if args.local else run_ray(config)
    except (ConfigError, SourceError, StoreMismatchError) as error:
        parser.error(str(error))
    except KeyboardInterrupt:
        note = "stopped while reading the flags; nothing was started" if config is None else interrupted_note(config)
        print(f"\ninterrupted: {note}", file=sys.stderr)
        return 130
    print(summary.render())
    print(f"features    {config.out}")
    return 1 if summary.failed_shards else 0


if __name__ == "__main__":
    sys.exit(main())
