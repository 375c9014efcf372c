"""Training data of both stages: webdataset shards as an endless, resumable stream of micro batches.

`shards` expands shard specs and splits them over readers, `stream` is the loader (`ShardLoader`) with its
exact-resume state, and `loaders` builds a run's loaders from its config. The decoders: `captions` for stage 1's
image-caption records, `features` for cached CLIP feature shards, and `conversations` for stage 2's images with
LLaVA-format conversations. Import from those modules directly; this package imports nothing so that config checks
stay fast (no torch import before they fail).
"""
