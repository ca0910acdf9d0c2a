"""Appending one token per sequence to a contiguous, optionally fp8, KV cache, in place."""

from pallas_kernels.cache_append.api import cache_append
from pallas_kernels.implementation import IMPLEMENTATIONS

__all__ = ["IMPLEMENTATIONS", "cache_append"]
