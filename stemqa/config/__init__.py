"""Config: the typed tree (schema) and how it is loaded from YAML presets, files and overrides."""
from stemqa.config.load import ConfigError, available_presets, load_config, to_yaml
from stemqa.config.schema import StemqaConfig

__all__ = ["ConfigError", "StemqaConfig", "available_presets", "load_config", "to_yaml"]
