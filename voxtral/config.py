"""One typed config for every stage.

Precedence: defaults < YAML file (``--config``) < environment (``VOXTRAL_<SECTION>__<KEY>``)
< command line (``--set section.key=value``). Unknown keys and bad values fail before any
work starts, with a message that names the key.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CONFIG = REPO_ROOT / "configs" / "local.yaml"
ENV_PREFIX = "VOXTRAL_"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class StorageConfig(Section):
    root: str = "./runs/local"
    """Local folder or ``s3://`` / ``gs://`` URI shared by every stage."""


class IndexConfig(Section):
    source: Literal["youtube", "local"] = "youtube"
    local_dir: str = "data/sample"
    searches: str = "data/searches.txt"
    results_per_term: int = Field(50, ge=1)
    max_terms: int | None = Field(None, ge=1)
    min_duration_s: float = Field(600.0, ge=0)
    max_duration_s: float = Field(4 * 3600.0, gt=0)
    concurrency: int = Field(4, ge=1)
    max_retries: int = Field(5, ge=0)
    backoff_s: float = Field(2.0, ge=0)


class ScrapeConfig(Section):
    min_chunk_s: float = Field(10.0, gt=0)
    max_chunk_s: float = Field(30.0, gt=0)
    min_speech_ratio: float = Field(0.3, ge=0, le=1)
    max_attempts: int = Field(3, ge=1)
    num_cpus: float = Field(0.25, gt=0)
    """CPUs reserved per download task: fractional so a node keeps many in flight."""
    concurrency: int = Field(8, ge=1)
    """Scrape tasks in flight per node."""
    timeout_s: float = Field(60.0, gt=0)
    retries: int = Field(3, ge=0)
    rate_limit: str | None = None
    cookies_file: str | None = None
    proxy: str | None = None

    @model_validator(mode="after")
    def _chunk_bounds(self) -> ScrapeConfig:
        if self.min_chunk_s > self.max_chunk_s:
            raise ValueError("scrape.min_chunk_s must be <= scrape.max_chunk_s")
        return self


class CodecConfig(Section):
    name: Literal["encodec", "mimi"] = "encodec"
    bandwidth: float = 1.5
    """EnCodec target bandwidth in kbps (1.5 → 2 codebooks, 3 → 4, 6 → 8, 12 → 16, 24 → 32)."""
    n_q: int | None = Field(None, ge=1)
    """Codebooks kept; for EnCodec derived from ``bandwidth`` when unset, for Mimi default 8."""
    pretrained: bool | str = False
    """True loads the published weights, False random init (tests, offline demo), a path a
    local checkpoint."""


class TokenizerConfig(Section):
    group_ms: float | None = None
    """Duration of one group (one text slot + whole codec frames); None = one frame."""
    text: bool = True
    text_lead_s: float = Field(0.5, ge=0)


class ModelConfig(Section):
    base: str = "mistralai/Mistral-7B-v0.3"
    """HF id, local folder, or ``tiny`` (a tiny random Mistral written under storage.root)."""
    keep_every: int = Field(1, ge=1)
    """Layer pruning: keep every k-th decoder layer (1 keeps all)."""
    gradient_checkpointing: bool = False
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


class PreprocessConfig(Section):
    batch_size: int = Field(8, ge=1)
    min_actors: int = Field(1, ge=1)
    max_actors: int = Field(1, ge=1)
    num_gpus: float = Field(0.0, ge=0)
    autocast: bool = False


class TrainConfig(Section):
    run_name: str = "voxtral"
    num_workers: int = Field(1, ge=1)
    use_gpu: bool = False
    zero_stage: int = 2
    offload_optimizer: bool = False
    offload_params: bool = False
    seq_len: int = Field(2048, ge=1)
    micro_batch: int = Field(1, ge=1)
    grad_accum: int = Field(1, ge=1)
    lr: float = Field(1e-4, gt=0)
    weight_decay: float = Field(0.0, ge=0)
    warmup_steps: int = Field(100, ge=0)
    max_steps: int = Field(1000, ge=1)
    grad_clip: float = Field(1.0, gt=0)
    eval_every: int = Field(100, ge=1)
    eval_fraction: float = Field(0.1, ge=0, lt=1)
    checkpoint_every: int = Field(200, ge=1)
    max_failures: int = Field(2, ge=0)
    seed: int = 0
    loss_weight_text: float = Field(1.0, ge=0)
    loss_weight_text_pad: float = Field(0.1, ge=0)
    loss_weight_audio_q0: float = Field(1.0, ge=0)
    loss_weight_audio_rest: float = Field(1.0, ge=0)
    sample_seconds: float = Field(3.0, ge=0)


class ServeConfig(Section):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    token: str | None = None
    model: str | None = None
    """Exported model folder; unset = newest export under storage.root, else the tiny model."""
    num_gpus: float = Field(0.0, ge=0)
    num_replicas: int = Field(1, ge=1)
    max_sessions: int = Field(16, ge=1)
    end_of_turn_ms: int = Field(600, ge=50)
    max_turn_s: float = Field(10.0, gt=0)
    max_message_bytes: int = Field(1 << 20, ge=1024)
    max_session_s: float = Field(1800.0, gt=0)
    idle_timeout_s: float = Field(60.0, gt=0)
    allowed_origins: list[str] = Field(default_factory=lambda: ["*"])
    text_temperature: float = Field(0.7, ge=0)
    text_top_k: int = Field(50, ge=0)
    text_top_p: float = Field(0.95, gt=0, le=1)
    audio_temperature: float = Field(0.8, ge=0)
    audio_top_k: int = Field(250, ge=0)
    audio_top_p: float = Field(1.0, gt=0, le=1)


class Config(Section):
    storage: StorageConfig = Field(default_factory=StorageConfig)
    index: IndexConfig = Field(default_factory=IndexConfig)
    scrape: ScrapeConfig = Field(default_factory=ScrapeConfig)
    codec: CodecConfig = Field(default_factory=CodecConfig)
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    preprocess: PreprocessConfig = Field(default_factory=PreprocessConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    serve: ServeConfig = Field(default_factory=ServeConfig)


class ConfigError(ValueError):
    """A config key or value is wrong; the message names it."""


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


def _flatten(data: Mapping[str, Any], origin: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for section, body in data.items():
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
        data = yaml.safe_load(p.read_text()) or {}
        if not isinstance(data, Mapping):
            raise ConfigError(f"{p}: top level must be a mapping of sections")
        for dotted, value in _flatten(data, str(p)).items():
            _set_path(tree, dotted, value, str(p))
    for name, raw in sorted(env.items()):
        if name.startswith(ENV_PREFIX) and "__" in name:
            dotted = name[len(ENV_PREFIX) :].lower().replace("__", ".", 1)
            _set_path(tree, dotted, _parse_scalar(raw), f"environment {name}")
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"--set expects section.key=value, got {item!r}")
        dotted, raw = item.split("=", 1)
        _set_path(tree, dotted.strip(), _parse_scalar(raw), "--set")
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
