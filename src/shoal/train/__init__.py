"""The training loop, evaluation, optimisers and atomic checkpoints."""
