"""Configuration: file → validated, frozen, typed objects (SPEC §2)."""

from .grammar import Address, HeaderRule, IPSet, Rate
from .load import ConfigError, Loaded, load_config, load_text
from .model import Config

__all__ = ["Address", "Config", "ConfigError", "HeaderRule", "IPSet", "Loaded", "Rate", "load_config", "load_text"]
