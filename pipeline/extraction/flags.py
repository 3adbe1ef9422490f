"""Config dataclasses as command-line flags: one flag per field, typed parsers, config files,
errors that name the flag, and local paths made absolute before anything is shipped or stored.

Shared by every job's config (extraction, distillation, probes).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import tomllib
from typing import Any

from pipeline.engine.shifts import Shift
from pipeline.store.uris import normalize_uri, read_uri


class ConfigError(ValueError):
    """A bad flag: the message starts with the flag's name."""

    def __init__(self, flag: str, message: str) -> None:
        super().__init__(f"{flag}: {message}")
        self.flag = flag


def flag_of(name: str) -> str:
    """The command-line flag of a config field: `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


class Flags:
    """Mixin for config dataclasses: `config.flags[field]` is the field's flag, for error messages."""

    @property
    def flags(self) -> dict[str, str]:
        return {f.name: flag_of(f.name) for f in dataclasses.fields(self)}


def option(help: str, **extra: Any) -> dict[str, Any]:
    """Field metadata that makes a config field a flag: its help and argparse extras."""
    return {"help": help, **extra}



def job_working_copy() -> bool:
    """Whether this driver runs under `ray job submit --working-dir`: its working directory is then a
    temporary copy, gone when the job ends. Ray's job supervisor hands the job's runtime env to the
    entrypoint in this variable."""
    raw = os.environ.get("RAY_JOB_CONFIG_JSON_ENV_VAR")
    return bool(raw) and bool(json.loads(raw).get("runtime_env", {}).get("working_dir"))


def with_absolute_uris(config: Any) -> Any:
    """The config with local paths made absolute here, on the driver, before anything is stored or
    shipped: actors and Ray Train workers run in other working directories, and a store or index
    must name the same place from anywhere. An output relative to a job's temporary working copy
    would vanish with it, and an input relative to it would be recorded under a path that changes
    with every change to the directory (so the same command could not resume): both are refused.
    A "hashed" input (a checkpoint) is recorded by its content's hash, so it may stay relative."""
    changes = {}
    for f in dataclasses.fields(config):
        value, kind = getattr(config, f.name), f.metadata.get("uri")
        if not kind or not value:
            continue
        relative = [v for v in (value if isinstance(value, tuple) else (value,)) if "://" not in v and not os.path.isabs(os.path.expanduser(v))]
        if relative and kind != "hashed" and job_working_copy():
            why = "which is deleted after the job" if kind == "output" else "whose path changes with every change to the directory, so the same command could not resume"
            raise ConfigError(flag_of(f.name), f"{relative[0]} is relative, and this job runs in Ray's temporary copy of its --working-dir ({os.getcwd()}), {why}: give an absolute path or a URI")
        changes[f.name] = tuple(map(normalize_uri, value)) if isinstance(value, tuple) else normalize_uri(value)
    return dataclasses.replace(config, **changes)


def field_default(f: dataclasses.Field) -> Any:
    return f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default



def _parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None


def _parse_floats(text: str) -> tuple[float, ...]:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def parse_words(text: str) -> tuple[str, ...]:
    return tuple(word.strip() for word in text.split(",") if word.strip())


def _parse_shifts(text: str) -> tuple[Shift, ...]:
    try:
        pairs = [tuple(int(v) for v in item.split(",")) for item in text.split(";") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected 'dy,dx;dy,dx;...', got {text!r}") from None
    if any(len(pair) != 2 for pair in pairs):
        raise argparse.ArgumentTypeError(f"every shift is 'dy,dx', got {text!r}")
    return tuple(pairs)  # type: ignore[arg-type]


def _parse_json(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not valid JSON ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


_PARSERS = {"ints": _parse_ints, "floats": _parse_floats, "shifts": _parse_shifts, "json": _parse_json, "words": parse_words}


def add_arguments(parser: argparse.ArgumentParser, config_type: type) -> None:
    """One flag per config field, with the field's default and help."""
    for f in dataclasses.fields(config_type):
        flag = flag_of(f.name)
        default = field_default(f)
        meta = dict(f.metadata)
        help_text = meta.pop("help")
        parse = meta.pop("parse", None)
        meta.pop("uri", None)
        if isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default, help=help_text)
            continue
        if parse:
            meta["type"] = _PARSERS[parse]
        elif f.type in ("int", "int | None"):
            meta["type"] = int
        elif f.type in ("float", "float | None"):
            meta["type"] = float
        shown = "" if meta.get("required") or default in (None, {}, "", ()) else f" (default: {show_value(default)})"
        parser.add_argument(flag, default=default, help=help_text + shown, **meta)


def show_value(value: Any) -> str:
    return ",".join(map(str, value)) if isinstance(value, tuple) else str(value)


CONFIG_FILE_HELP = "YAML, JSON or TOML file of flag values, keys named like the flags (batch_size: 64, layers: [5, 11]); flags given here override it"
SECRET_WORDS = ("key", "secret", "token", "password", "credential")


def parse_with_config_file(parser: argparse.ArgumentParser, argv: list[str] | None, config_type: type) -> argparse.Namespace:
    """Parse `argv`, taking defaults from the `--config` file when one is given (so explicit flags
    win); an unknown key or a bad file fails naming `--config`."""
    early = argparse.ArgumentParser(add_help=False, allow_abbrev=False)
    early.add_argument("--config")
    path = early.parse_known_args(argv)[0].config
    if path:
        values = read_config_file(path, config_type)
        parser.set_defaults(**values)
        for action in parser._actions:  # a required flag the file gives is no longer required
            if action.dest in values:
                action.required = False
    return parser.parse_args(argv)


def read_config_file(path: str, config_type: type) -> dict[str, Any]:
    """Flag values from a YAML, JSON or TOML file, converted as the flags' own parsers convert them."""
    import yaml

    try:
        text = read_uri(path).decode()
        values = tomllib.loads(text) if path.endswith(".toml") else json.loads(text) if path.endswith(".json") else yaml.safe_load(text)
    except (OSError, ValueError, yaml.YAMLError) as error:
        raise ConfigError("--config", f"cannot read {path}: {error}") from error
    if not isinstance(values, dict):
        raise ConfigError("--config", f"{path} must hold a mapping of flag names to values")
    fields = {f.name: f for f in dataclasses.fields(config_type)}
    values = {key.replace("-", "_"): value for key, value in values.items()}
    if unknown := sorted(set(values) - set(fields)):
        raise ConfigError("--config", f"{path}: unknown keys {unknown}; keys are the flags' names, e.g. {sorted(fields)[:4]}")
    return {name: _from_file(fields[name], value) for name, value in values.items()}


def _from_file(field: dataclasses.Field, value: Any) -> Any:
    parse = field.metadata.get("parse")
    if parse and isinstance(value, str):
        return _PARSERS[parse](value)
    if isinstance(value, list):
        return tuple(tuple(v) if isinstance(v, list) else v for v in value)
    return value


def masked(config: Any) -> dict[str, Any]:
    """Every field of a config, with storage-option values that look like credentials hidden:
    what is printed at start and kept in summary.json."""
    values = dataclasses.asdict(config)
    options = values.get("storage_options") or {}
    values["storage_options"] = {k: "***" if any(word in k.lower() for word in SECRET_WORDS) else v for k, v in options.items()}
    return values


def from_args(args: argparse.Namespace, config_type: type) -> Any:
    """The config of parsed flags, its local paths absolute (raises ConfigError, see `with_absolute_uris`)."""
    return with_absolute_uris(config_type(**{f.name: getattr(args, f.name) for f in dataclasses.fields(config_type)}))
