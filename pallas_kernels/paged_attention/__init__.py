"""Ragged paged attention: decode rows, prompt chunks and packed prompts over a paged, optionally fp8,
KV cache, in one call; and the page write."""

from pallas_kernels.implementation import IMPLEMENTATIONS
from pallas_kernels.paged_attention.api import append, check_page_size, paged_attention
from pallas_kernels.paged_attention.config import DecodeConfig, PagedAttentionConfig, default_config

__all__ = ["IMPLEMENTATIONS", "DecodeConfig", "PagedAttentionConfig", "append", "check_page_size", "default_config",
           "paged_attention"]
