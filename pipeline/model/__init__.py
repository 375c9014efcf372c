"""Model code: the frozen CLIP vision tower, the trainable Perceiver Resampler and the frozen LLM, composed."""
