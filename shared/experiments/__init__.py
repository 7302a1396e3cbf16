"""nanokimi.experiments: small experiments on TinyKimi (`python -m nanokimi.experiments.<name>`)."""
