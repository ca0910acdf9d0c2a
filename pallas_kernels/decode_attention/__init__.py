"""Decode attention (one new token per sequence) over a contiguous, optionally fp8, KV cache."""

from pallas_kernels.decode_attention.api import decode_attention
from pallas_kernels.decode_attention.config import DecodeAttentionConfig, default_config
from pallas_kernels.implementation import IMPLEMENTATIONS

__all__ = ["IMPLEMENTATIONS", "DecodeAttentionConfig", "decode_attention", "default_config"]
