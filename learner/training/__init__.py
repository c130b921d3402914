"""Training: the DeepSpeed trainer, weight publishing to the rollouts, learner ranks and checkpoints."""
