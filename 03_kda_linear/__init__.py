"""nanokimi.kda: Kimi Delta Attention (Kimi Linear). Public API re-exported here as the chapter lands."""
