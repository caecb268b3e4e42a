"""The configuration: one TOML file (or the embedded default) read into a frozen Config tree."""

from postroom.config.file import default_config, load_config, render_default_config
from postroom.config.model import (
    CONFIG_NAME,
    DEFAULT_DATA_DIR,
    Config,
    ConfigError,
    Route,
    postmaster_address,
)
from postroom.config.values import Endpoint

__all__ = [
    "CONFIG_NAME", "DEFAULT_DATA_DIR", "Config", "ConfigError", "Endpoint", "Route",
    "default_config", "load_config", "postmaster_address", "render_default_config",
]
