"""Inference: a trained run or export loaded back without DeepSpeed, the export format, and generation prompts."""
