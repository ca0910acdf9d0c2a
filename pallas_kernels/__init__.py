from pallas_kernels.grouped_matmul import grouped_matmul, grouped_matmul_swiglu  # noqa: F401
