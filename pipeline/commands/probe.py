"""Linear probes for monocular depth or semantic segmentation on feature stores, side by side.

    python jobs/probe.py --task depth --train nyu_train.zarr --test nyu_test.zarr \\
        --truth data/nyu/nyu_train.txt --eigen-crop --out probes/nyu --local
    python jobs/probe.py --task segmentation --num-classes 150 --reduce-zero-label \\
        --train plain_train.zarr,srt_train.zarr --test plain_val.zarr,srt_val.zarr \\
        --truth ADEChallengeData2016/annotations --out probes/ade            # Ray Train

One probe per --train/--test pair; the table compares them. Ground truth pairs with the images of
both stores (a folder named like the images, or a list file naming both). A rerun against the
same --out resumes each probe from its last checkpoint; a finished probe is only scored again.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import torch

from pipeline.commands import log_to_stderr, training_parser
from pipeline.extraction.flags import ConfigError, from_args, parse_with_config_file
from pipeline.tasks.probes.config import ProbeConfig, ensemble_plan, validate
from pipeline.tasks.probes.metrics import DEPTH_METRICS
from pipeline.tasks.probes.probe import evaluate, evaluate_output_ensemble, train_probe, write_scores
from pipeline.tasks.shared.training import fit_on_ray, latest_checkpoint, progress_line

COLUMNS = {"depth": ("rmse", "rmse_log", "abs_rel", "sq_rel", "a1", "a2", "a3"), "segmentation": ("mIoU", "mAcc", "aAcc")}
LABELS = {"rmse": "RMSE", "rmse_log": "RMSE-log", "abs_rel": "AbsRel", "sq_rel": "SqRel", "a1": "d<1.25", "a2": "d<1.25^2", "a3": "d<1.25^3"}


def build_parser() -> argparse.ArgumentParser:
    return training_parser(__doc__, ProbeConfig)


def log(metrics: dict[str, Any]) -> None:
    print(progress_line("probe", metrics), flush=True)


def table(task: str, rows: dict[str, dict[str, Any]]) -> str:
    """One line per probe; depth in metres, segmentation in percent as the benchmarks report them."""
    columns = COLUMNS[task]
    width = max(len(name) for name in rows) + 2
    lines = ["probe".ljust(width) + "".join(LABELS.get(c, c).rjust(10) for c in columns) + "    images"]
    for name, scores in rows.items():
        values = [scores[c] if c in DEPTH_METRICS else 100 * scores[c] for c in columns]
        lines.append(name.ljust(width) + "".join(f"{v:10.4f}" if task == "depth" else f"{v:10.2f}" for v in values) + f"{scores['images']:10d}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    log_to_stderr()
    parser = build_parser()
    try:
        args = parse_with_config_file(parser, argv, ProbeConfig)
        config = from_args(args, ProbeConfig)
        validate(config)
    except ConfigError as error:
        parser.error(str(error))
    device = "cuda" if torch.cuda.is_available() else "cpu"
    rows: dict[str, dict[str, Any]] = {}
    for pair in range(len(config.train)):
        found = latest_checkpoint(config.folder(pair), config.storage_options)
        if found and found[1]["step"] >= config.steps:
            print(f"probe {config.name(pair)}: trained ({config.steps} steps) in {config.folder(pair)}; scoring it again")
        elif args.local:
            train_probe(config, pair=pair, device=device, report=log)
        else:
            fit_on_ray("probe", train_probe, config, config.num_workers, pair=pair)
        rows[config.name(pair)] = evaluate(config, pair, device)
    if config.output_ensemble:
        plain, source = ensemble_plan(config)
        for pair in plain:
            rows[f"{config.name(pair)} + output ensemble"] = evaluate_output_ensemble(config, pair, source, device)
    write_scores(config, rows)
    print(table(config.task, rows))
    missing = {name: r["missing_truth"] for name, r in rows.items() if r["missing_truth"]}
    if missing:
        print("no ground truth for " + ", ".join(f"{n} images of {name}" for name, n in missing.items()) + " (not scored)")
    print(f"scores      {config.out.rstrip('/')}/scores.json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
