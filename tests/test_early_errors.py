"""Bad flags and unreachable sources are answered before any cluster starts, in one line naming
the flag: a typo must not cost a Ray start-up, and an S3 error must not cost a screen of traceback."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import fsspec
import huggingface_hub
import pytest

from pipeline.commands.extract import main as extract_main
from pipeline.extraction.config import ExtractConfig
from pipeline.extraction.flags import ConfigError
from pipeline.extraction.runner import run_local
from tests.test_extract_local import small_argv

MODEL = "vit_tiny_patch16_224"


@pytest.fixture
def no_cluster(monkeypatch):
    """Starting or asking a Ray cluster fails the test: these errors must come before one."""

    def started(*_, **__):
        raise AssertionError("a Ray cluster was started or asked before the error")

    monkeypatch.setattr("pipeline.extraction.distributed.ray.init", started)
    monkeypatch.setattr("pipeline.extraction.distributed.cluster_nodes", started)


def one_line_error(capsys, argv: list[str]) -> str:
    """Run srt-extract on Ray (not --local); return its error, which must be one line."""
    with pytest.raises(SystemExit) as exited:
        extract_main(argv)
    err = capsys.readouterr().err
    assert exited.value.code == 2, err
    assert "Traceback" not in err and "Retry" not in err, err
    message = err.rstrip("\n").splitlines()[-1]
    assert message.startswith("extract.py: error: ") or ": error: " in message, err
    assert "usage:" not in err and message.endswith(" --help)"), err  # the error and where to look, no usage before it
    return message.split(": error: ", 1)[1].rsplit(" (see ", 1)[0]


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def test_a_missing_dataset_is_refused_before_ray(tmp_path, capsys, no_cluster):
    message = one_line_error(capsys, small_argv(str(tmp_path / "no-such-folder"), str(tmp_path / "out.zarr")))
    assert message == f"--dataset {tmp_path / 'no-such-folder'}: no such file or directory"
    assert not (tmp_path / "out.zarr").exists()


def test_an_unwritable_out_is_refused_before_ray(tmp_path, sample_paths, capsys, no_cluster):
    (tmp_path / "file").write_text("x")
    message = one_line_error(capsys, small_argv(str(sample_paths[0].parent), str(tmp_path / "file" / "out.zarr")))
    assert message.startswith("--out: cannot write a store at ")


def test_a_feature_store_given_as_dataset_is_refused(tmp_path, sample_paths, capsys, no_cluster):
    store = tmp_path / "samples.zarr"
    run_local(ExtractConfig(dataset=str(sample_paths[0].parent), out=str(store), model=MODEL, image_size=32, radius=1, stride=8))
    message = one_line_error(capsys, small_argv(str(store), str(tmp_path / "again.zarr")))
    assert message == f"--dataset {store} is a feature store (it holds zarr.json): give the images' folder, file list or containers"
    assert not (tmp_path / "again.zarr").exists()


def test_pretrained_weights_neither_cached_nor_reachable_fail_at_once(tmp_path, sample_paths, capsys, no_cluster, monkeypatch):
    """One request to the hub, no retries: the hub client alone would retry for about a minute."""
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{closed_port()}")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    argv = [*small_argv(str(sample_paths[0].parent), str(tmp_path / "out.zarr")), "--pretrained"]
    message = one_line_error(capsys, argv)
    assert message.startswith(f"--pretrained: weights for {MODEL} are not in the local cache and http://127.0.0.1:")
    assert "cannot be reached (URLError: " in message and message.endswith("pass --weights URI of a local or fsspec checkpoint")


@pytest.fixture
def no_aws_credentials(monkeypatch, tmp_path):
    """No credentials anywhere botocore looks (environment, files, instance metadata)."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE", "AWS_DEFAULT_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")


def test_s3_without_credentials_is_one_line_naming_the_dataset(tmp_path, s3_server, capsys, no_cluster, no_aws_credentials):
    fsspec.filesystem("s3", **s3_server).pipe("bucket/creds/a.jpg", Path(__file__).read_bytes())
    options = {"client_kwargs": s3_server["client_kwargs"], "skip_instance_cache": True}
    argv = [*small_argv("s3://bucket/creds", str(tmp_path / "out.zarr")), "--storage-options", json.dumps(options)]
    message = one_line_error(capsys, argv)
    assert message.startswith("--dataset s3://bucket/creds cannot be read (NoCredentialsError: ")
    assert message.endswith("check the URI and --storage-options")


def test_an_unreachable_s3_endpoint_is_one_line_naming_the_dataset(tmp_path, s3_server, capsys, no_cluster):
    options = {**s3_server, "client_kwargs": {"endpoint_url": f"http://127.0.0.1:{closed_port()}", "region_name": "us-east-1"},
               "config_kwargs": {"retries": {"max_attempts": 1}}, "skip_instance_cache": True}  # fmt: skip
    argv = [*small_argv("s3://bucket/anything", str(tmp_path / "out.zarr")), "--storage-options", json.dumps(options)]
    message = one_line_error(capsys, argv)
    assert message.startswith("--dataset s3://bucket/anything cannot be read (EndpointConnectionError: ")


def test_relative_inputs_under_a_job_working_copy_are_refused(monkeypatch, tmp_path):
    """`ray job submit --working-dir .` runs the driver in a copy whose path changes with the
    directory: a relative --dataset recorded there could never be resumed. A checkpoint is
    recorded by its hash, so it may stay relative."""
    from pipeline.extraction.config import resolve

    monkeypatch.chdir(tmp_path)
    (tmp_path / "ckpt.pt").write_bytes(b"hashed, never parsed here")
    monkeypatch.setenv("RAY_JOB_CONFIG_JSON_ENV_VAR", json.dumps({"runtime_env": {"working_dir": "gcs://_ray_pkg_x.zip"}}))
    with pytest.raises(ConfigError, match=r"^--dataset: data/samples is relative, and this job runs in Ray's temporary copy .* could not resume"):
        resolve(ExtractConfig(dataset="data/samples", out="/abs/out.zarr", model=MODEL))
    resolved = resolve(ExtractConfig(dataset="/abs/data", out="/abs/out.zarr", model=MODEL, weights="ckpt.pt"))
    assert resolved.config.weights == str(tmp_path / "ckpt.pt")
    monkeypatch.delenv("RAY_JOB_CONFIG_JSON_ENV_VAR")
    assert resolve(ExtractConfig(dataset="data/samples", out="o.zarr", model=MODEL)).config.dataset == str(tmp_path / "data" / "samples")


@pytest.mark.parametrize("stage", ["parse_with_config_file", "from_args"])
def test_ctrl_c_while_the_flags_are_read_is_a_clean_stop(tmp_path, sample_paths, capsys, monkeypatch, no_cluster, stage):
    import os
    import signal
    import time

    from pipeline.commands import extract

    real = getattr(extract, stage)

    def interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C, delivered to this (the main) thread
        time.sleep(5)  # the interrupt lands here, while the flags are being read
        return real(*args, **kwargs)

    monkeypatch.setattr(extract, stage, interrupted)
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)  # as in a fresh process (an earlier test's Ray may hold SIGINT)
    try:
        assert extract_main(small_argv(str(sample_paths[0].parent), str(tmp_path / "out.zarr"))) == 130
    finally:
        signal.signal(signal.SIGINT, previous)
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "interrupted: stopped while reading the flags; nothing was started", err
    assert not (tmp_path / "out.zarr").exists()


def test_actors_a_local_instance_could_never_place_are_refused_before_it_starts(tmp_path, sample_paths, capsys, no_cluster, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setattr("pipeline.extraction.distributed.joins_a_cluster", lambda: False)  # as on a machine without `ray start`
    message = one_line_error(capsys, small_argv(str(sample_paths[0].parent), str(tmp_path / "out.zarr")) + ["--cpus-per-actor", "1024"])
    assert message.startswith("--num-actors, --cpus-per-actor: 1 actors of 1024 CPUs each do not fit the cluster's 1 node(s)")
    assert message.endswith("and it cannot grow (no autoscaler); ask for less")


@pytest.mark.parametrize("command", ["extract", "build_index", "query", "serve", "visualize", "eval_retrieval", "propagate", "saliency", "distill", "probe", "discover"])
def test_a_bad_flag_is_one_line_pointing_to_help_and_no_flag_is_abbreviated(command, capsys):
    import importlib

    module = importlib.import_module(f"pipeline.commands.{command}")
    with pytest.raises(SystemExit) as exited:
        module.main(["--no-such-flag"])
    err = capsys.readouterr().err
    assert exited.value.code == 2 and len(err.strip().splitlines()) == 1, err  # not the 28-line usage first
    assert ": error: " in err and err.strip().endswith("--help)"), err
    assert module.build_parser().allow_abbrev is False  # a flag's prefix is never taken for the flag


def test_a_misspelt_flag_is_not_taken_for_the_flag_it_begins(capsys):
    from pipeline.commands.extract import build_parser

    args, unknown = build_parser().parse_known_args(["--dataset", "d", "--out", "o", "--strid", "8"])
    assert args.stride is None and unknown == ["--strid", "8"]


@pytest.mark.parametrize(("model", "first_guess"), [("vit_smal_patch16_224", "vit_small_patch16_224"), ("vit_small_patch16_224.dinoo", "vit_small_patch16_224.dino")])
def test_an_unknown_model_suggests_the_nearest_timm_names(tmp_path, sample_paths, capsys, no_cluster, model, first_guess):
    argv = small_argv(str(sample_paths[0].parent), str(tmp_path / "out.zarr"))
    argv[argv.index("--model") + 1] = model
    message = one_line_error(capsys, argv)
    assert message.startswith(f"--model: unknown timm model {model!r}: did you mean {first_guess}, ")


def test_a_resume_refused_for_another_config_is_refused_before_ray(tmp_path, sample_paths, capsys, no_cluster):
    out = tmp_path / "out.zarr"
    assert extract_main([*small_argv(str(sample_paths[0].parent), str(out)), "--local"]) == 0
    capsys.readouterr()
    message = one_line_error(capsys, [*small_argv(str(sample_paths[0].parent), str(out)), "--stride", "16"])
    assert message.startswith(f"--out {out} was written with a different config") and "stride" in message


def test_a_rerun_with_nothing_to_do_starts_no_ray_and_prints_the_summary(tmp_path, sample_paths, capsys, no_cluster):
    out = tmp_path / "out.zarr"
    assert extract_main([*small_argv(str(sample_paths[0].parent), str(out)), "--local"]) == 0
    capsys.readouterr()
    assert extract_main(small_argv(str(sample_paths[0].parent), str(out))) == 0  # on Ray, but ray.init would fail the test
    said = capsys.readouterr().out
    assert "images      0 (0 ok, 0 errors); 2 shards already done" in said and f"features    {out}" in said
