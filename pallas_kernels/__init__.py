from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_swiglu  # noqa: F401
from pallas_kernels.decode_attention import decode_attention  # noqa: F401
from pallas_kernels.cache_append import cache_append  # noqa: F401
