"""Stage-1 data: webdataset shards of image-caption pairs as an endless, resumable stream of micro batches.

`shards` expands shard specs and splits them over readers, `stream` is the loader (`ShardLoader`) with its
exact-resume state, and `captions` decodes image-caption records and collates them. Import from those modules
directly; this package imports nothing so that config checks stay fast (no torch import before they fail).
"""
