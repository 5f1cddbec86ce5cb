"""Training MoE language models: data, checkpoints, the loop and its report."""
