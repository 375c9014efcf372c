"""Samples that cannot be trained on: the reasons they are skipped for, their counting, and the one warning line.

A decoder raises `SkipSample` with a reason; the stream counts it in a `SkipLog` (cumulative over the run, resumes
included, all-reduced for the `skipped/*` metrics) and goes on. Warnings are rate-limited, one per interval, each
naming the shard.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable

from pipeline.data.shards import OversizedMember

logger = logging.getLogger(__name__)

# corrupt_image: image bytes that do not decode; oversized_image: more pixels than data.max_image_pixels even at the
# decoder's smallest draft scale; oversized_member: a tar member over shards.MAX_MEMBER_BYTES, never read;
# bad_caption: a caption that is not UTF-8. Stage 2 adds bad_conversation (unreadable or malformed conversation
# JSON) and no_supervised_tokens (nothing of an assistant turn left within the sequence budget).
SKIP_REASONS = (
    "corrupt_image",
    "oversized_image",
    "oversized_member",
    "empty_caption",
    "bad_caption",
    "missing_member",
    "bad_tar",
    "bad_conversation",
    "no_supervised_tokens",
)
WARNING_INTERVAL_S = 10.0

Decoder = Callable[[dict[str, bytes], str], dict]
Collate = Callable[[list[dict]], dict]


class SkipSample(Exception):
    """Raised by a decoder for a sample that must be skipped; `reason` (one of SKIP_REASONS) is its counter."""

    def __init__(self, reason: str, detail: str = ""):
        # A fixed set of reasons keeps every rank's counters the same keys, so they can be all-reduced.
        if reason not in SKIP_REASONS:
            raise ValueError(f"unknown skip reason '{reason}'; use one of {SKIP_REASONS} or add it there")
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class SkipLog:
    """Cumulative counts of skipped samples by reason, with warnings limited to one per interval."""

    def __init__(self, counts: dict[str, int] | None = None):
        self.counts = dict.fromkeys(SKIP_REASONS, 0)
        self.counts.update(counts or {})
        self._last_warning_s = -math.inf
        self._suppressed = 0

    def record(self, reason: str, shard: str, what: str, detail: str = "") -> None:
        self.counts[reason] = self.counts.get(reason, 0) + 1
        now = time.monotonic()
        if now - self._last_warning_s < WARNING_INTERVAL_S:
            self._suppressed += 1
            return
        note = f" ({detail})" if detail else ""
        more = f"; {self._suppressed} more skipped since the last warning" if self._suppressed else ""
        logger.warning("skipped %s of shard %s: %s%s%s", what, shard, reason, note, more)
        self._last_warning_s, self._suppressed = now, 0


def decode_record(decoder: Decoder, members: dict[str, bytes], key: str) -> dict:
    """`decoder(members, key)`, after skipping a record that has a member too large to have been read."""
    for extension, data in members.items():
        if isinstance(data, OversizedMember):
            raise SkipSample("oversized_member", f"{key}.{extension} has {data.size} bytes")
    return decoder(members, key)


def describe_error(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text[:200]}"
