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
import dataclasses
import logging
import sys
import time
from typing import Any

from pipeline.config import CONFIG_FILE_HELP, ConfigError, add_arguments, from_args, parse_with_config_file
from pipeline.distill import DistillConfig, read_sidecar, train_worker, validate


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser, DistillConfig)
    parser.add_argument("--config", help=CONFIG_FILE_HELP)
    parser.add_argument("--local", action="store_true", help="train in this process, without Ray")
    return parser


def progress_line(metrics: dict[str, Any]) -> str:
    return "distill  " + "  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items())


def log(metrics: dict[str, Any]) -> None:
    print(progress_line(metrics), flush=True)


def _ray_worker(config: dict[str, Any]) -> None:
    import ray.train
    import ray.train.torch

    context = ray.train.get_context()
    rank = context.get_world_rank()

    def report(metrics: dict[str, Any]) -> None:
        if rank == 0:  # through logging: Ray Train shows a worker's print() twice
            logging.getLogger("srt.distill").info(progress_line(metrics))
        if "loss" in metrics:  # every worker reports the same steps: Ray Train synchronizes on them
            ray.train.report({k: v for k, v in metrics.items() if isinstance(v, (int, float))})

    train_worker(DistillConfig(**config), rank=rank, world=context.get_world_size(), device=ray.train.torch.get_device(), report=report)


def run_ray(config: DistillConfig) -> None:
    import ray
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if not ray.is_initialized():
        ray.init(log_to_driver=True)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    workers = config.num_workers or max(1, gpus)
    trainer = TorchTrainer(
        _ray_worker,
        train_loop_config=dataclasses.asdict(config),
        scaling_config=ScalingConfig(num_workers=workers, use_gpu=gpus > 0, resources_per_worker=None if gpus else {"CPU": 1}),
        run_config=RunConfig(name=f"distill-{time.strftime('%Y%m%d-%H%M%S')}"),  # resuming is ours: from --out
    )
    trainer.fit()


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
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
        run_ray(config)
    sidecar = read_sidecar(config.out, config.storage_options)
    distance = sidecar["held_out_distance"]
    if distance["teacher"] is not None:
        print(f"held-out    mean squared distance to the SRT targets: teacher {distance['teacher']:.4g}, student {distance['student']:.4g}")
    print(f"student     {config.out.rstrip('/')}/model.safetensors  (sidecar model.json; {sidecar['steps']} steps)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
