"""Converters from foreign checkpoint formats to jaxfire checkpoints."""

from convert.hf import ConversionError, convert_hf
from convert.readers import CheckpointReadError

__all__ = ["CheckpointReadError", "ConversionError", "convert_hf"]
