"""The README, the CLI and the stored config use the same flag names and defaults; CI runs the README's test command."""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import re
import shlex
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

from pipeline import __version__
from pipeline.commands import COMMANDS
from pipeline.commands.distill import build_parser as build_distill_parser
from pipeline.commands.extract import build_parser
from pipeline.commands.probe import build_parser as build_probe_parser
from pipeline.extraction.config import ExtractConfig
from pipeline.tasks.distillation.distill import DistillConfig
from pipeline.tasks.probes.config import ProbeConfig

ROOT = Path(__file__).resolve().parent.parent


def readme_flags(section: str = "Extraction (srt-extract)") -> dict[str, str]:
    """{flag: shown default} of the flag table in docs/flags.md's section `## {section}` (the README points there)."""
    text = (ROOT / "docs" / "flags.md").read_text().split(f"\n## {section}\n", 1)[1].split("\n## ", 1)[0]
    return dict(re.findall(r"^\| `(--[a-z0-9-]+)[^`]*` \| `([^`]*)` \|", text, re.MULTILINE))


def shown(field: dataclasses.Field) -> str:
    default = field.default_factory() if field.default_factory is not dataclasses.MISSING else field.default
    if field.metadata.get("required"):
        return "required"
    if isinstance(default, bool):
        return "on" if default else "off"
    if default in (None, ()):
        return "—"
    if isinstance(default, tuple):
        return ",".join(map(str, default))
    return "{}" if default == {} else str(default)


JOBS = [("Extraction (srt-extract)", ExtractConfig, build_parser), ("Self-distillation (srt-distill)", DistillConfig, build_distill_parser), ("Probes (srt-probe)", ProbeConfig, build_probe_parser)]


@pytest.mark.parametrize(("section", "config_type", "_"), JOBS)
def test_readme_lists_every_flag_with_its_config_default(section, config_type, _):
    documented = readme_flags(section)
    for field in dataclasses.fields(config_type):
        flag = "--" + field.name.replace("_", "-")
        assert documented.get(flag) == shown(field), flag


@pytest.mark.parametrize(("section", "config_type", "parser_of"), JOBS)
def test_cli_flags_and_defaults_come_from_the_config(section, config_type, parser_of):
    parser = parser_of()
    cli = {a.dest: a.default for a in parser._actions if a.dest not in ("help", "local", "config", "verbose")}
    config = config_type()
    assert cli.keys() == {f.name for f in dataclasses.fields(config_type)}
    for name, default in cli.items():
        if not parser._option_string_actions["--" + name.replace("_", "-")].required:
            assert default == getattr(config, name), name
    assert set(readme_flags(section)) == {"--" + name.replace("_", "-") for name in cli} | {"--local", "--config"} | ({"--verbose"} if section.startswith("Extraction") else set())


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: .*\n\t\$\(PYTHON\) -m pytest", makefile, re.MULTILINE)


@pytest.mark.parametrize("job", ["extract", "distill", "query", "visualize", "eval_retrieval", "probe"])
def test_every_flag_of_every_job_says_what_it_does(job):
    parser = importlib.import_module(f"pipeline.commands.{job}").build_parser()
    silent = [action.option_strings[0] for action in parser._actions if action.option_strings and not action.help]
    assert not silent


def test_extract_help_shows_its_examples_as_written():
    text = build_parser().format_help()
    assert "--dataset s3://bucket/images \\\n        --out s3://bucket/feats.zarr --pretrained" in text


def test_the_demo_uses_the_default_model_so_the_help_example_resumes_it():
    demo = next(line for line in (ROOT / "Makefile").read_text().splitlines() if "jobs/extract.py" in line)
    assert "--model" not in demo and "--dataset data/samples --out out/samples.zarr" in demo
    assert "python jobs/extract.py --dataset data/samples --out out/samples.zarr " in build_parser().format_help()


def test_the_installed_wheel_runs_its_commands_outside_the_checkout(tmp_path, sample_paths):
    """`pip install` of the built wheel into a fresh environment gives working commands. The heavy
    dependencies come from this environment (no index here); the package only from the wheel."""
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "dist")], check=True, timeout=300)
    wheel = next((tmp_path / "dist").glob("srt_pipeline-*.whl"))
    with zipfile.ZipFile(wheel) as archive:  # one top-level package, under the project's name: no `schemas` to collide with
        assert {name.split("/")[0] for name in archive.namelist() if not name.split("/")[0].endswith(".dist-info")} == {"pipeline"}
        assert {"pipeline/commands/service/static/index.html", "pipeline/commands/service/static/app.js", "pipeline/commands/service/static/style.css"} <= set(archive.namelist())  # srt-serve's page
    subprocess.run([sys.executable, "-m", "venv", str(tmp_path / "fresh")], check=True, timeout=300)
    fresh_site = next((tmp_path / "fresh" / "lib").glob("python3*/site-packages"))
    (fresh_site / "dependencies.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")  # torch, ray, ...: not the editable checkout
    bin_dir = tmp_path / "fresh" / "bin"
    subprocess.run([bin_dir / "python", "-m", "pip", "install", "--no-deps", "--no-index", "-q", str(wheel)], check=True, timeout=300)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    where = subprocess.run([bin_dir / "python", "-c", "import pipeline; print(pipeline.__file__)"], cwd=outside, capture_output=True, text=True, check=True)
    assert where.stdout.startswith(str(fresh_site))
    assert all((bin_dir / script).exists() for script in ("srt", *COMMANDS))
    version = subprocess.run([bin_dir / "srt", "--version"], cwd=outside, capture_output=True, text=True)
    assert version.stdout.strip() == f"srt-pipeline {__version__}"
    argv = ["--dataset", str(sample_paths[0].parent), "--out", "feats.zarr", "--model", "vit_tiny_patch16_224", "--image-size", "32", "--radius", "1", "--local"]
    done = subprocess.run([bin_dir / "srt-extract", *argv], cwd=outside, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert f"features    {outside / 'feats.zarr'}" in done.stdout and "4 ok" in done.stdout


def readme_commands() -> list[tuple[str, list[str]]]:
    """Every pipeline command of the README's shell blocks, as (script, argv): continuation lines
    joined, `for v in a b; do ... done` loops unrolled, `ray job submit ... --` prefixes dropped."""
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, re.DOTALL):
        lines = re.sub(r"\\\n\s*", " ", block).splitlines()
        loop: tuple[str, list[str]] | None = None
        for line in (raw.split(" #", 1)[0].strip() for raw in lines):
            if not line or line.startswith("#"):
                continue
            if found := re.match(r"for (\w+) in ([^;]+); do$", line):
                loop = (found[1], found[2].split())
                continue
            if line == "done":
                loop = None
                continue
            for value in loop[1] if loop else [None]:
                expanded = re.sub(rf"\$\{{?{loop[0]}\}}?", value, line) if loop else line
                words = shlex.split(expanded)
                if "--" in words and words[:1] in (["ray"], ["RAY_AUTH_MODE=token"]):
                    words = words[words.index("--") + 1 :]
                if words[:1] == ["python"] and words[1:2] and words[1].startswith("jobs/"):
                    commands.append((Path(words[1]).stem, words[2:]))
                elif words[:1] and words[0].startswith("srt-"):
                    commands.append((SCRIPTS[words[0]], words[1:]))
    return commands


SCRIPTS = {"srt-extract": "extract", "srt-index": "build_index", "srt-query": "query", "srt-eval-retrieval": "eval_retrieval", "srt-visualize": "visualize",
           "srt-propagate": "propagate", "srt-saliency": "saliency", "srt-distill": "distill", "srt-probe": "probe", "srt-discover": "discover", "srt-serve": "serve"}  # fmt: skip


def test_readme_commands_are_found():
    found = {script for script, _ in readme_commands()}
    assert {"extract", "build_index", "query", "probe", "distill", "discover", "propagate", "saliency"} <= found, found


@pytest.mark.parametrize(("script", "argv"), readme_commands(), ids=lambda value: value if isinstance(value, str) else " ".join(value)[:60])
def test_every_readme_command_parses_and_resolves(script, argv, monkeypatch, tmp_path):
    """Without running it: the flags parse, and an extraction's config resolves (presets, the
    model's facts, every check that needs no data). Weights files are not read."""
    from pipeline.extraction.config import resolve
    from pipeline.extraction.flags import ConfigError, from_args, parse_with_config_file

    monkeypatch.setattr("pipeline.extraction.config.weights_id", lambda name, **_: "not read")
    monkeypatch.setattr("pipeline.extraction.config.stored_provenance", lambda *_: None)  # as if --out held no store yet
    module = importlib.import_module(f"pipeline.commands.{script}")
    parser = module.build_parser()
    config_type = {"extract": ExtractConfig, "distill": DistillConfig, "probe": ProbeConfig}.get(script)
    try:
        if config_type is None:
            parser.parse_args(argv)
            return
        config = from_args(parse_with_config_file(parser, argv, config_type), config_type)
        if config_type is ExtractConfig:
            resolve(config)
    except ConfigError as error:
        pytest.fail(f"{script} {' '.join(argv)}: {error}")


def demo_commands() -> list[list[str]]:
    """`make demo`'s commands as the Makefile writes them, `$(PYTHON)` this interpreter."""
    recipe = (ROOT / "Makefile").read_text().split("\ndemo:", 1)[1].split("\n\n", 1)[0].splitlines()[1:]
    return [shlex.split(line.strip().replace("$(PYTHON)", sys.executable)) for line in recipe if line.startswith("\t")]


@pytest.mark.timeout(300)
def test_the_demo_prints_short_plain_lines_when_not_on_a_terminal(tmp_path):
    """What a new user sees in a log or CI: one line per message, none over 200 characters, no
    colour codes, no carriage returns (the bar writes a line at a time), and the summary."""
    (tmp_path / "data").mkdir()
    subprocess.run(["cp", "-r", str(ROOT / "data" / "samples"), str(tmp_path / "data")], check=True)
    said = ""
    for command in demo_commands():
        command = [str(ROOT / word) if word.startswith("jobs/") else word for word in command]
        done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=280)
        assert done.returncode == 0, done.stderr[-2000:]
        said += done.stdout + done.stderr
    assert "\x1b" not in said and "\r" not in said
    assert not [line for line in said.splitlines() if len(line) > 200]
    assert "images      4 (4 ok, 0 errors)" in said and "started a local Ray instance" in said and (tmp_path / "out" / "samples.png").exists()


def walkthrough() -> list[str]:
    """The command lines of the README's "Your own images in five commands", as written."""
    section = (ROOT / "README.md").read_text().split("\n## Your own images in five commands\n", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.DOTALL)[1]
    return [line.split("  #", 1)[0].strip() for line in block.splitlines() if line.strip() and not line.startswith("#")]


@pytest.mark.timeout(400)
def test_the_readme_walkthrough_runs_as_written(tmp_path, sample_paths):
    """Each line in a shell, in the environment `make test` made (the activate line's PATH): a
    folder of photos to features, an index, a query, the page, and photos added later."""
    import time
    import urllib.request

    photos = tmp_path / "my_photos"
    photos.mkdir()
    for path in sample_paths:
        (photos / path.name).write_bytes(path.read_bytes())
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    env.pop("RAY_ADDRESS", None)
    lines = walkthrough()
    assert [line.split()[0] for line in lines] == ["srt-extract", "srt-index", "srt-query", "srt-serve", "srt-extract", "srt-index"]
    said = {}
    for number, line in enumerate(lines):
        if line.startswith("srt-serve"):  # runs until stopped: ask it one search, then stop it
            server = subprocess.Popen(["bash", "-c", f"exec {line}"], cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            try:
                deadline = time.monotonic() + 120
                while time.monotonic() < deadline:
                    try:
                        with urllib.request.urlopen("http://127.0.0.1:8000/api/search?image=coffee.jpg&k=2", timeout=5) as answer:
                            said[number] = json.loads(answer.read())
                        break
                    except OSError:
                        time.sleep(0.5)
            finally:
                server.terminate()
                server.wait(30)
            continue
        if line.startswith("srt-extract") and "--append" in line:
            (photos / "coffee-again.jpg").write_bytes((photos / "coffee.jpg").read_bytes())  # a photo added since
        done = subprocess.run(["bash", "-c", line], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, f"{line}\n{done.stderr[-2000:]}"
        said[number] = done.stdout
    assert "images      4 (4 ok, 0 errors)" in said[0] and said[3]["results"][0]["uri"].endswith("coffee.jpg")
    table = said[2].splitlines()
    assert table[0].split() == ["query", "rank", "score", "image_id", "uri"] and len(table) == 4 and table[1].split()[-1].endswith("coffee.jpg")
    assert "appended    1 items" in said[4]
    from pipeline.tasks.retrieval.index import load_index

    assert load_index(str(tmp_path / "my_photos.index")).index.ntotal == 5  # the added photo is indexed too
