"""nanokimi.serving: Mooncake: KVCache-centric serving. Public API re-exported here as the chapter lands."""
