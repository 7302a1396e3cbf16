"""nanokimi.moba: MoBA: Mixture of Block Attention. Public API re-exported here as the chapter lands."""
