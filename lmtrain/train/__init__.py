"""Training: optimizers, the jitted step, the sharded state, checkpoints, metrics and the loop."""
