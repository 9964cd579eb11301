"""Building the config: defaults < YAML file (``--config``) < environment
(``VOXTRAL_<SECTION>__<KEY>``) < command line (``--set section.key=value``), and the
``--config``/``--set`` flags every job takes."""

from __future__ import annotations

import argparse
import os
import types
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Union, get_args, get_origin

import yaml
from pydantic import ValidationError

from voxtral.config.base import ConfigError
from voxtral.config.sections import Config

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "local.yaml"
ENV_PREFIX = "VOXTRAL_"


def _set_path(tree: dict[str, Any], dotted: str, value: Any, origin: str) -> None:
    parts = dotted.split(".")
    if len(parts) != 2 or not all(parts):
        raise ConfigError(f"{origin}: expected section.key, got {dotted!r}")
    section, key = parts
    if section not in Config.model_fields:
        raise ConfigError(f"{origin}: unknown config section {section!r} in {dotted!r}")
    fields = Config.model_fields[section].annotation.model_fields  # type: ignore[union-attr]
    if key not in fields:
        raise ConfigError(f"{origin}: unknown config key {dotted!r}")
    tree.setdefault(section, {})[key] = value


def _parse_scalar(text: str) -> Any:
    """Parse a command-line or environment value the way YAML would (``1`` → int, ``true``)."""
    try:
        return yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        return text


def _is_text_field(section: str, key: str) -> tuple[bool, bool]:
    """(the field holds only text, it may be None): such values are taken verbatim, so
    ``serve.token=0123`` stays the string "0123" instead of YAML's int (or octal)."""
    fields = Config.model_fields[section].annotation.model_fields  # type: ignore[union-attr]
    ann = fields[key].annotation
    args = set(get_args(ann)) if get_origin(ann) in (Union, types.UnionType) else {ann}
    return args - {type(None)} == {str}, type(None) in args


def _parse_value(dotted: str, text: str) -> Any:
    section, _, key = dotted.partition(".")
    try:
        is_text, nullable = _is_text_field(section, key)
    except (KeyError, AttributeError):  # unknown key: _set_path reports it
        return _parse_scalar(text)
    if not is_text:
        return _parse_scalar(text)
    return None if nullable and text.strip() in ("null", "Null", "NULL", "~") else text


def _flatten(data: Mapping[str, Any], origin: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, body in data.items():
        if body is None:  # a section whose keys are all commented out
            continue
        if not isinstance(body, Mapping):
            raise ConfigError(f"{origin}: section {section!r} must be a mapping")
        for key, value in body.items():
            out[f"{section}.{key}"] = value
    return out


def load_config(
    path: str | os.PathLike | None = None,
    overrides: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> Config:
    """Build the config from a YAML file, the environment and ``section.key=value`` overrides."""
    env = os.environ if env is None else env
    tree: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file not found: {p}")
        try:
            data = yaml.safe_load(p.read_text()) or {}
        except yaml.YAMLError as exc:
            raise ConfigError(f"{p}: not valid YAML: {exc}") from None
        if not isinstance(data, Mapping):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        for dotted, value in _flatten(data, str(p)).items():
            _set_path(tree, dotted, value, str(p))
    for name, raw in sorted(env.items()):
        if name.startswith(ENV_PREFIX) and "__" in name:
            dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".", 1)
            _set_path(tree, dotted, _parse_value(dotted, raw), f"environment {name}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        dotted = dotted.strip()
        _set_path(tree, dotted, _parse_value(dotted, raw), "--set")
    try:
        return Config.model_validate(tree)
    except ValidationError as exc:
        problems = "; ".join(
            f"{'.'.join(str(p) for p in err['loc'])}: {err['msg']}" for err in exc.errors()
        )
        raise ConfigError(f"invalid config: {problems}") from None


def add_config_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument(
        "--config", default=str(DEFAULT_CONFIG), help="YAML config (default: configs/local.yaml)"
    )
    parser.add_argument(
        "--set",
        dest="overrides",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="override one config value (repeatable)",
    )
    return parser


def config_from_args(args: argparse.Namespace) -> Config:
    return load_config(args.config, args.overrides)


def parse_cli(
    argv: Sequence[str] | None = None,
    description: str = "",
    parser: argparse.ArgumentParser | None = None,
) -> tuple[Config, argparse.Namespace]:
    """Parse ``--config``/``--set`` (plus a job's own flags, from ``parser``) for a job
    script; a bad config exits with a message naming the key."""
    parser = add_config_args(parser or argparse.ArgumentParser(description=description))
    args = parser.parse_args(argv)
    try:
        return config_from_args(args), args
    except ConfigError as exc:
        parser.error(str(exc))
        raise  # unreachable: parser.error exits
