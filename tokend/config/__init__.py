"""Configuration: the schema, and loading it from YAML with errors that point at lines."""

from tokend.config._load import (
    ConfigError,
    ConfigIssue,
    load_config,
    read_secret_file,
    resolve_config_path,
    summarize,
)
from tokend.config._schema import (
    AccountConfig,
    AllowConfig,
    BackoffConfig,
    BreakerConfig,
    Config,
    LogConfig,
    OnChangeConfig,
    OutputConfig,
    ProviderConfig,
    RateLimitConfig,
    RefreshPolicyConfig,
    ServeConfig,
    StateConfig,
    parse_duration,
)

__all__ = [
    "AccountConfig",
    "AllowConfig",
    "BackoffConfig",
    "BreakerConfig",
    "Config",
    "ConfigError",
    "ConfigIssue",
    "LogConfig",
    "OnChangeConfig",
    "OutputConfig",
    "ProviderConfig",
    "RateLimitConfig",
    "RefreshPolicyConfig",
    "ServeConfig",
    "StateConfig",
    "load_config",
    "parse_duration",
    "read_secret_file",
    "resolve_config_path",
    "summarize",
]
