"""One loader worker's readers: its shards of every source as shuffled raw records, and samples from them in micro
batches. `pipeline.data.stream` explains the layout and how their small state makes resume exact.
"""

from __future__ import annotations

import bisect
import logging
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

from pipeline.data.shards import DataError, iter_shard_records, reader_shards
from pipeline.data.skips import Collate, Decoder, SkipLog, SkipSample, decode_record, describe_error

logger = logging.getLogger(__name__)

# That many skipped samples in a row means a systematic problem (wrong decoder for these shards, say), which
# an endless stream would otherwise hide behind rate-limited warnings while yielding nothing.
MAX_CONSECUTIVE_SKIPS = 1000


def seeded_rng(*keys: int) -> np.random.Generator:
    # PCG64's state is four integers, small enough to ship with every batch.
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([key & (2**63 - 1) for key in keys])))


@dataclass
class Source:
    where: str  # config key of the spec, e.g. "data.sources[0].shards", for messages
    shards: list[str]
    weight: float


class SourceReader:
    """One source's shards of one reader as an endless stream of raw records through a shuffle buffer."""

    def __init__(
        self,
        source: Source,
        source_index: int,
        reader_index: int,
        num_readers: int,
        shuffle_buffer: int,
        seed: int,
        skips: SkipLog,
        state: dict | None = None,
    ):
        self.where = source.where
        self.shards = reader_shards(source.shards, reader_index, num_readers)
        self.skips = skips
        self.capacity = max(1, shuffle_buffer)
        self._seed_keys = (seed, source_index, reader_index)
        self._orders: dict[int, list[str]] = {}
        self._records: Iterator | None = None  # the open current shard
        # Entries are (reference, shard, key, members) with reference = (epoch, position, record index).
        self.buffer: list[tuple[tuple[int, int, int], str, str, dict[str, bytes]]] = []
        self.rng = seeded_rng(*self._seed_keys, 0)
        self.epoch = self.position = self.records_read = self.records_in_epoch = 0
        self._refs_to_restore: list[tuple[int, int, int]] | None = None
        if state is not None:
            self.epoch, self.position = state["epoch"], state["position"]
            self.records_read, self.records_in_epoch = state["records_read"], state["records_in_epoch"]
            self.rng.bit_generator.state = state["rng"]
            # Re-read lazily, in the worker: the main process builds readers only to describe a fresh state.
            self._refs_to_restore = [tuple(ref) for ref in state["buffer"]]

    def state_dict(self) -> dict:
        refs = self._refs_to_restore if self._refs_to_restore is not None else [entry[0] for entry in self.buffer]
        return {
            "epoch": self.epoch,
            "position": self.position,
            "records_read": self.records_read,
            "records_in_epoch": self.records_in_epoch,
            "buffer": [list(ref) for ref in refs],
            "rng": self.rng.bit_generator.state,
        }

    def order(self, epoch: int) -> list[str]:
        """This reader's shards in the order of `epoch`: a permutation seeded by seed, source, reader, epoch."""
        if epoch not in self._orders:
            if len(self._orders) >= 4:
                self._orders.pop(min(self._orders))
            permutation = seeded_rng(*self._seed_keys, 1, epoch).permutation(len(self.shards))
            self._orders[epoch] = [self.shards[i] for i in permutation]
        return self._orders[epoch]

    def next_record(self) -> tuple[tuple[int, int, int], str, str, dict[str, bytes]]:
        """The next raw record out of the shuffle buffer, as (reference, shard, key, members)."""
        if self._refs_to_restore is not None:
            self._rebuild_buffer()
        while len(self.buffer) < self.capacity:
            self.buffer.append(self._read_record())
        if len(self.buffer) > 1:
            index = int(self.rng.integers(len(self.buffer)))
            self.buffer[index], self.buffer[-1] = self.buffer[-1], self.buffer[index]
        return self.buffer.pop()

    def _read_record(self):
        while True:
            shard = self.order(self.epoch)[self.position]
            if self._records is None:
                self._records = iter_shard_records(shard)
            try:
                key, members = next(self._records)
            except StopIteration:
                self._next_shard()
                continue
            except Exception as error:  # any read failure is a property of the data: log, count, move on
                self.skips.record("bad_tar", shard, f"the rest after record {self.records_read}", describe_error(error))
                self._next_shard()
                continue
            reference = (self.epoch, self.position, self.records_read)
            self.records_read += 1
            self.records_in_epoch += 1
            return reference, shard, key, members

    def _next_shard(self) -> None:
        close_quietly(self._records)
        self._records = None
        self.records_read = 0
        self.position += 1
        if self.position == len(self.shards):
            if self.records_in_epoch == 0:
                # Raising beats looping forever over shards that yield nothing.
                raise DataError(
                    f"'{self.where}': reader {self._seed_keys[2]} read no sample in a whole pass over its "
                    f"{len(self.shards)} shards (all empty or unreadable; see the bad_tar warnings); fix the shards"
                )
            self.epoch, self.position, self.records_in_epoch = self.epoch + 1, 0, 0

    def _rebuild_buffer(self) -> None:
        """Re-read the records that the restored buffer references point to, and reopen the current shard."""
        refs, self._refs_to_restore = self._refs_to_restore, None
        wanted: dict[tuple[int, int], set[int]] = defaultdict(set)
        for epoch, position, index in refs:
            wanted[(epoch, position)].add(index)
        found: dict[tuple[int, int, int], tuple] = {}
        current = (self.epoch, self.position)
        for epoch, position in sorted(wanted):
            if (epoch, position) != current:
                self._collect(epoch, position, wanted[(epoch, position)], found, stop_after=True)
        if self.records_read:
            self._records = self._collect(self.epoch, self.position, wanted[current], found, stop_after=False)
        missing = [ref for ref in refs if ref not in found]
        if missing:
            epoch, position, index = missing[0]
            logger.warning(
                "resume is not exact: %d buffered samples of '%s' could not be re-read (first: record %d of %s); "
                "the shards changed since the checkpoint",
                len(missing),
                self.where,
                index,
                self.order(epoch)[position],
            )
        self.buffer = [(ref, *found[ref]) for ref in refs if ref in found]

    def _collect(self, epoch: int, position: int, indices: set[int], found: dict, stop_after: bool):
        """Read one shard up to its last wanted record (or up to `records_read` for the current shard)."""
        shard = self.order(epoch)[position]
        last = max(indices, default=-1) if stop_after else self.records_read - 1
        records = iter_shard_records(shard)
        try:
            for index in range(last + 1):
                key, members = next(records)
                if index in indices:
                    found[(epoch, position, index)] = (shard, key, members)
        except Exception as error:
            logger.warning("resume is not exact: re-reading %s failed (%s)", shard, describe_error(error))
            close_quietly(records)
            if not stop_after:
                self._next_shard()
            return None
        if stop_after:
            close_quietly(records)
            return None
        return records


def close_quietly(records: Iterator | None) -> None:
    try:
        if records is not None:
            records.close()
    except Exception:  # the shard is being abandoned; an error closing it changes nothing
        pass


class SampleReader:
    """One reader (a DataLoader worker of one rank): decoded samples from all its sources, in micro batches."""

    def __init__(
        self,
        sources: list[Source],
        reader_index: int,
        num_readers: int,
        shuffle_buffer: int,
        seed: int,
        state: dict | None = None,
    ):
        self.reader_index = reader_index
        self.skips = SkipLog(state["skips"] if state else None)
        self.samples = state["samples"] if state else 0
        self.sources = [
            SourceReader(
                source,
                i,
                reader_index,
                num_readers,
                shuffle_buffer,
                seed,
                self.skips,
                state["sources"][i] if state else None,
            )
            for i, source in enumerate(sources)
        ]
        self.choice_rng = seeded_rng(seed, reader_index, 2)
        if state:
            self.choice_rng.bit_generator.state = state["choice_rng"]
        self._cumulative_weights = list(np.cumsum([source.weight for source in sources]))

    def state_dict(self) -> dict:
        return {
            "reader": self.reader_index,
            "samples": self.samples,
            "skips": dict(self.skips.counts),
            "choice_rng": self.choice_rng.bit_generator.state,
            "sources": [source.state_dict() for source in self.sources],
        }

    def _pick_source(self) -> SourceReader:
        if len(self.sources) == 1:
            return self.sources[0]
        point = self.choice_rng.random() * self._cumulative_weights[-1]
        return self.sources[min(bisect.bisect_right(self._cumulative_weights, point), len(self.sources) - 1)]

    def next_sample(self, decoder: Decoder) -> dict:
        for _ in range(MAX_CONSECUTIVE_SKIPS):
            _, shard, key, members = self._pick_source().next_record()
            try:
                sample = decode_record(decoder, members, key)
            except SkipSample as skip:
                self.skips.record(skip.reason, shard, f"sample {key}", skip.detail)
                continue
            self.samples += 1
            return sample
        raise DataError(
            f"reader {self.reader_index} skipped {MAX_CONSECUTIVE_SKIPS} samples in a row (counts so far: "
            f"{self.skips.counts}); check that the decoder matches the shards and that the shards are intact"
        )

    def next_batch(self, decoder: Decoder, collate: Collate, micro_batch_size: int) -> dict:
        return collate([self.next_sample(decoder) for _ in range(micro_batch_size)])
