"""Evaluation: loading a trained run for inference, and scoring generated captions."""
