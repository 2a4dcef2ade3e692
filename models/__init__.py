"""MAEST network, mel front-end, registry and checkpoint loading (no Lightning, no Sacred here)."""

from .maest import MAEST, MAESTConfig
from .mel import MelSpectrogram
from .registry import REGISTRY, get_maest, get_spec, list_models

__all__ = ["MAEST", "MAESTConfig", "MelSpectrogram", "REGISTRY", "get_maest", "get_spec", "list_models"]
