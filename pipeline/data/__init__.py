"""Stage-1 data: webdataset shards of image-caption pairs as an endless, resumable stream of micro batches.

`shards` expands shard specs and splits them over readers, `stream` is the loader (`ShardLoader`) with its
exact-resume state, and `captions` decodes image-caption records and collates them.
"""

from pipeline.data.captions import CaptionDecoder, CaptionSampleDecoder, collate_captions, iterate_eval_batches
from pipeline.data.shards import DataError, expand_shards
from pipeline.data.stream import SKIP_REASONS, ShardLoader, SkipLog, SkipSample

__all__ = [
    "SKIP_REASONS",
    "CaptionDecoder",
    "CaptionSampleDecoder",
    "DataError",
    "ShardLoader",
    "SkipLog",
    "SkipSample",
    "collate_captions",
    "expand_shards",
    "iterate_eval_batches",
]
