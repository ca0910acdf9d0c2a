"""Grouped (ragged) expert matmul for mixture-of-experts layers: bf16 and FP8, with a fused SwiGLU.

See README.md in this directory for the layouts, backends and measured speeds.
"""

from pallas_kernels.grouped_matmul.api import grouped_matmul, grouped_matmul_swiglu
from pallas_kernels.grouped_matmul.config import Config

__all__ = ["Config", "grouped_matmul", "grouped_matmul_swiglu"]
