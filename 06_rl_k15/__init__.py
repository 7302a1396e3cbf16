"""nanokimi.rl: k1.5 reinforcement learning: policy mirror descent, length penalty, partial rollouts. Public API re-exported here as the chapter lands."""
