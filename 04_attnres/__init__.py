"""nanokimi.attnres: Attention Residuals and Block AttnRes. Public API re-exported here as the chapter lands."""
