"""The README, the CLI and the stored config use the same flag names and defaults; CI runs the README's test command."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

from jobs.extract import build_parser
from pipeline.config import ExtractConfig

ROOT = Path(__file__).resolve().parent.parent


def readme_flags() -> dict[str, str]:
    rows = re.findall(r"^\| `(--[a-z-]+)[^`]*` \| `([^`]*)` \|", (ROOT / "README.md").read_text(), re.MULTILINE)
    return dict(rows)


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


def test_readme_lists_every_flag_with_its_config_default():
    documented = readme_flags()
    for field in dataclasses.fields(ExtractConfig):
        flag = "--" + field.name.replace("_", "-")
        assert documented.get(flag) == shown(field), flag


def test_cli_flags_and_defaults_come_from_the_config():
    parser = build_parser()
    cli = {a.dest: a.default for a in parser._actions if a.dest not in ("help", "local")}
    config = ExtractConfig()
    assert cli.keys() == {f.name for f in dataclasses.fields(ExtractConfig)}
    for name, default in cli.items():
        if name not in ("dataset", "out"):
            assert default == getattr(config, name), name
    assert set(readme_flags()) == {"--" + name.replace("_", "-") for name in cli} | {"--local"}


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    assert "make test" in readme and "make demo" in readme
    assert "make test" in (ROOT / ".ci" / "run").read_text()
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^test: .*\n\t\$\(PYTHON\) -m pytest", makefile, re.MULTILINE)
