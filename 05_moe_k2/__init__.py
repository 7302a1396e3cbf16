"""nanokimi.moe: The K2 MoE: sigmoid router, aux-loss-free bias balancing, grouped GEMM. Public API re-exported here as the chapter lands."""
