"""Self-distillation: train a ViT whose single pass approaches the SRT features of a store (Ray Train).

    python jobs/distill.py --store feats.zarr --out student/ --pretrained        # local Ray instance
    ray job submit --working-dir . -- python jobs/distill.py --store s3://b/feats.zarr \\
        --out s3://b/student --weights s3://b/dino_vits16.pth --num-workers 4   # a Ray cluster
    python jobs/distill.py ... --local                                           # no Ray at all

Then extract with one plain pass of the student:
    python jobs/extract.py --weights student/model.safetensors --shifts 0,0 --stride 16 ...

A rerun against the same --out resumes from its last checkpoint.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

from pipeline.commands import log_to_stderr, training_parser
from pipeline.extraction.flags import ConfigError, from_args, parse_with_config_file
from pipeline.tasks.distillation.distill import DistillConfig, read_sidecar, train_worker, validate
from pipeline.tasks.shared.training import fit_on_ray, progress_line


def build_parser() -> argparse.ArgumentParser:
    return training_parser(__doc__, DistillConfig)


def log(metrics: dict[str, Any]) -> None:
    print(progress_line("distill", metrics), flush=True)


def main(argv: list[str] | None = None) -> int:
    log_to_stderr()
    parser = build_parser()
    try:
        args = parse_with_config_file(parser, argv, DistillConfig)
    except ConfigError as error:
        parser.error(str(error))
    try:
        config = from_args(args, DistillConfig)
        validate(config)
    except ConfigError as error:
        parser.error(str(error))
    if args.local:
        train_worker(config, report=log)
    else:
        fit_on_ray("distill", train_worker, config, config.num_workers)
    sidecar = read_sidecar(config.out, config.storage_options)
    distance = sidecar["held_out_distance"]
    if distance["teacher"] is not None:
        print(f"held-out    mean squared distance to the SRT targets: teacher {distance['teacher']:.4g}, student {distance['student']:.4g}")
    print(f"student     {config.out.rstrip('/')}/model.safetensors  (sidecar model.json; {sidecar['steps']} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
