"""nanokimi.uncertainty: CUPID: plug-in aleatoric and epistemic uncertainty. Public API re-exported here as the chapter lands."""
