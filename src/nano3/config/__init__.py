"""params.yaml, read once: the raw tree DVC tracks and its typed sections (`Params.settings`)."""

from nano3.config.loader import (
           PARAMS_FILE,
           Params,
           load_params,
           parse_override,
           parse_settings,
           set_key,
           yaml_load,
)
from nano3.config.sections import Settings, section_name

__all__ = ["PARAMS_FILE", "Params", "Settings", "load_params", "parse_override", "parse_settings", "section_name",
           "set_key", "yaml_load"]
