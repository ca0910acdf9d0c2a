"""Mixture-of-experts routing in one kernel: router logits, softmax, top-k and renormalisation.

See README.md in this directory.
"""

from pallas_kernels.moe_route.api import moe_route

__all__ = ["moe_route"]
