"""One typed config for every stage (:mod:`voxtral.config.sections`, the serving section in
:mod:`voxtral.config.serve`), built from defaults,
a YAML file, the environment and ``--set`` overrides (:mod:`voxtral.config.load`)."""

from voxtral.config.base import ConfigError, Section
from voxtral.config.load import (
    DEFAULT_CONFIG,
    ENV_PREFIX,
    REPO_ROOT,
    add_config_args,
    config_from_args,
    load_config,
    parse_cli,
)
from voxtral.config.sections import (
    ENCODEC_BANDWIDTH_NQ,
    MIMI_MAX_NQ,
    CodecConfig,
    Config,
    DiarizeConfig,
    IndexConfig,
    ModelConfig,
    PreprocessConfig,
    ScrapeConfig,
    StorageConfig,
    TextConfig,
    TokenizerConfig,
    TrainConfig,
)
from voxtral.config.serve import LOOPBACK_HOSTS, ServeConfig, is_loopback, token_digest

__all__ = [
    "CodecConfig",
    "Config",
    "ConfigError",
    "DEFAULT_CONFIG",
    "DiarizeConfig",
    "ENCODEC_BANDWIDTH_NQ",
    "ENV_PREFIX",
    "IndexConfig",
    "LOOPBACK_HOSTS",
    "MIMI_MAX_NQ",
    "ModelConfig",
    "PreprocessConfig",
    "REPO_ROOT",
    "ScrapeConfig",
    "Section",
    "ServeConfig",
    "StorageConfig",
    "TextConfig",
    "TokenizerConfig",
    "TrainConfig",
    "add_config_args",
    "config_from_args",
    "is_loopback",
    "token_digest",
    "load_config",
    "parse_cli",
]
