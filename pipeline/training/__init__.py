"""Training: process groups, the DeepSpeed loop, checkpoints, metrics and export."""
