"""The training sample stream: endless, shuffled, weighted over sources, and resumable exactly after any step.

Layout: `ShardLoader` (main process) wraps a `torch.utils.data.DataLoader` over a `BatchStream`; each
DataLoader worker runs one `SampleReader` that owns a fixed subset of every source's shards (see
`shards.reader_shards`) and yields complete micro batches. A reader keeps one `SourceReader` per source (its
shards in a fresh seeded order every epoch, read through a seeded shuffle buffer of raw records) and picks
the source of each sample with its own seeded RNG in proportion to the source weights.

Exact resume: a reader's whole future is a function of its small state (per source: epoch, position in the
epoch's shard order, records already read from the current shard, the shuffle buffer as references
(epoch, position, record index) and the RNG states; plus the source-choice RNG and skip counters). Each batch
carries the state of its reader after producing it; the loader keeps the latest one per worker and orders
them by who delivers next, so a new loader built from `state_dict()` continues with the same batches. Only
the shards that buffer references point into are re-read on restore.
"""

from __future__ import annotations

import bisect
import functools
import logging
import math
import os
import signal
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.shards import (
    DataError,
    OversizedMember,
    check_enough_shards,
    expand_shards,
    iter_shard_records,
    reader_shards,
    shard_fingerprint,
)

logger = logging.getLogger(__name__)

STATE_VERSION = 1
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
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>
# That many skipped samples in a row means a systematic problem (wrong decoder for these shards, say), which
# an endless stream would otherwise hide behind rate-limited warnings while yielding nothing.
MAX_CONSECUTIVE_SKIPS = 1000

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


class BatchStream(IterableDataset):
    """What each DataLoader worker runs: its reader's endless micro batches, tagged with state and worker id."""

    def __init__(
        self,
        sources: list[Source],
        reader_states: list[dict],
        decoder: Decoder,
        collate: Collate,
        micro_batch_size: int,
        num_readers: int,
        shuffle_buffer: int,
        seed: int,
    ):
        self.sources = sources
        self.reader_states = reader_states
        self.decoder = decoder
        self.collate = collate
        self.micro_batch_size = micro_batch_size
        self.num_readers = num_readers
        self.shuffle_buffer = shuffle_buffer
        self.seed = seed

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        if num_workers != len(self.reader_states):
            raise RuntimeError(f"BatchStream has {len(self.reader_states)} reader states for {num_workers} workers")
        state = self.reader_states[worker_id]
        reader = SampleReader(self.sources, state["reader"], self.num_readers, self.shuffle_buffer, self.seed, state)
        while True:
            batch = reader.next_batch(self.decoder, self.collate, self.micro_batch_size)
            batch["data_state"] = reader.state_dict()
            batch["worker_id"] = worker_id
            yield batch


def keep_batch(batch: dict) -> dict:
    """DataLoader collate for items that are already batches (module level so that workers can pickle it)."""
    return batch


def leave_stop_signals_to_the_trainer(trainer_pid: int, _worker_id: int) -> None:
    """Data-loader workers ignore SIGTERM and SIGUSR1: Slurm and the deepspeed launcher signal every process of a
    job, and torch's worker handler dies on SIGTERM, which would fail the rank before the trainer can checkpoint.

    Since nothing then stops a worker by signal, a worker is also killed by the kernel when the rank that started
    it dies, however it dies (Linux's parent-death signal)."""
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGUSR1, signal.SIG_IGN)
    die_with_parent(trainer_pid)


def die_with_parent(parent_pid: int) -> None:
    """Ask Linux to SIGKILL this process when its parent, `parent_pid`, exits (a no-op on other systems)."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent_pid:  # the parent died before the request was made
        os._exit(1)


class ShardLoader:
    """This rank's endless, resumable stream of micro batches over weighted webdataset sources.

    `sources` are (shard spec, weight) pairs; `decoder(members, key)` turns a raw record into a sample dict or
    raises `SkipSample`; `collate(samples)` makes the batch. Iterating yields batch dicts with the collated
    fields plus "data_state" and "worker_id"; `state_dict()` after any batch resumes exactly after it.
    """

    def __init__(
        self,
        sources: list[tuple[str, float]],
        decoder: Decoder,
        collate: Collate,
        *,
        micro_batch_size: int,
        num_workers: int,
        shuffle_buffer: int,
        seed: int,
        rank: int,
        world_size: int,
        state: dict | None = None,
        where_prefix: str = "data.sources",
        multiprocessing_context: str = "fork",
        pin_memory: bool = False,
        allow_missing_shards: bool = False,
    ):
        if not sources:
            raise DataError(f"'{where_prefix}' is empty; give at least one shard spec")
        if micro_batch_size <= 0 or num_workers < 0 or not 0 <= rank < world_size:
            raise DataError(
                f"invalid loader layout: micro_batch_size={micro_batch_size}, num_workers={num_workers}, "
                f"rank={rank}, world_size={world_size}"
            )
        self.readers_per_rank = max(1, num_workers)
        num_readers = world_size * self.readers_per_rank
        self.sources = []
        for i, (spec, weight) in enumerate(sources):
            where = f"{where_prefix}[{i}].shards"
            if not weight > 0:
                raise DataError(f"'{where_prefix}[{i}].weight' must be positive, got {weight}")
            shards = expand_shards(spec, where, allow_missing_shards)
            check_enough_shards(shards, num_readers, where, world_size, self.readers_per_rank)
            self.sources.append(Source(where, shards, weight))
        self.layout = {
            "version": STATE_VERSION,
            "rank": rank,
            "world_size": world_size,
            "readers_per_rank": self.readers_per_rank,
            "seed": seed,
            "sources": [
                {"where": s.where, "num_shards": len(s.shards), "fingerprint": shard_fingerprint(s.shards)}
                for s in self.sources
            ],
        }
        if state is None:
            reader_states = [
                SampleReader(
                    self.sources, rank * self.readers_per_rank + w, num_readers, shuffle_buffer, seed
                ).state_dict()
                for w in range(self.readers_per_rank)
            ]
        else:
            reader_states = self._check_state(state, num_workers)
        # Worker w starts from reader_states[w]; until it delivers, that is also its latest state.
        self._latest_states = list(reader_states)
        self._delivered = 0
        self._stream = BatchStream(
            self.sources, reader_states, decoder, collate, micro_batch_size, num_readers, shuffle_buffer, seed
        )
        self._loader_options = {"num_workers": num_workers, "pin_memory": pin_memory}
        if num_workers:
            # Fork starts workers fast and shares what is already imported. It is safe with CUDA and
            # torch.distributed initialised because workers touch neither; the decoder loads its tokenizer
            # lazily inside each worker, and tokenizers' own thread pool (the known fork hazard) stays off.
            # Everything in the stream pickles, so "forkserver" or "spawn" also work where fork is unwelcome.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
            self._loader_options.update(
                multiprocessing_context=multiprocessing_context,
                persistent_workers=True,
                prefetch_factor=2,
                worker_init_fn=functools.partial(leave_stop_signals_to_the_trainer, os.getpid()),
            )
        self._dataloader: DataLoader | None = None
        self._iterator: Iterator[dict] | None = None

    def _check_state(self, state: dict, num_workers: int) -> list[dict]:
        layout = self.layout
        if not isinstance(state, dict) or state.get("version") != STATE_VERSION:
            version = state.get("version") if isinstance(state, dict) else None
            raise DataError(f"data state has version {version}, this code reads {STATE_VERSION}; resume without it")
        if (state["world_size"], state["readers_per_rank"]) != (layout["world_size"], layout["readers_per_rank"]):
            raise DataError(
                f"data state was saved with world size {state['world_size']} x {state['readers_per_rank']} readers "
                f"per rank, this run has {layout['world_size']} x {layout['readers_per_rank']} "
                f"(data.num_workers={num_workers}); the shard split differs, so use the same number of ranks and "
                "data.num_workers or resume without the data state"
            )
        if state["rank"] != layout["rank"]:
            raise DataError(f"data state belongs to rank {state['rank']} but was given to rank {layout['rank']}")
        if state["seed"] != layout["seed"]:
            raise DataError(f"data state was saved with data.seed={state['seed']}, this run has {layout['seed']}")
        if len(state["sources"]) != len(layout["sources"]):
            raise DataError(
                f"data state has {len(state['sources'])} sources, this run has {len(layout['sources'])}; "
                "use the same data.sources or resume without the data state"
            )
        for saved, now in zip(state["sources"], layout["sources"], strict=True):
            if saved["fingerprint"] != now["fingerprint"]:
                raise DataError(
                    f"'{now['where']}' lists different shards than when the data state was saved "
                    f"({saved['num_shards']} then, {now['num_shards']} now); restore the spec or resume without "
                    "the data state"
                )
        readers = sorted(reader["reader"] for reader in state["readers"])
        first = layout["rank"] * layout["readers_per_rank"]
        if readers != list(range(first, first + layout["readers_per_rank"])):
            raise DataError(f"data state for rank {layout['rank']} holds readers {readers}; it is corrupt")
        return list(state["readers"])

    def __iter__(self) -> Iterator[dict]:
        while True:
            if self._iterator is None:
                self._start_workers()
            batch = next(self._iterator)
            worker = batch["worker_id"]
            if worker != self._delivered % self.readers_per_rank:
                raise RuntimeError(f"batch {self._delivered} came from worker {worker}, not round-robin")
            self._latest_states[worker] = batch["data_state"]
            self._delivered += 1
            yield batch

    def _start_workers(self) -> None:
        # Workers start from the latest states, ordered so that worker 0 is the reader that delivers next; that
        # also makes iterating again after `close()` continue the stream. The loader keeps a single DataLoader
        # iterator, because a second `iter()` of a DataLoader would restart the workers from their first states.
        self._latest_states = self.state_dict()["readers"]
        self._stream.reader_states = list(self._latest_states)
        self._delivered = 0
        # A generator of its own: by default a DataLoader draws its workers' base seed from the global torch RNG when
        # iteration starts, which would shift the training process's random stream (LoRA dropout) on every resume.
        generator = torch.Generator().manual_seed(self._stream.seed)
        self._dataloader = DataLoader(
            self._stream, batch_size=None, collate_fn=keep_batch, generator=generator, **self._loader_options
        )
        self._iterator = iter(self._dataloader)

    def state_dict(self) -> dict:
        """Layout plus reader states ordered by who delivers next: readers[j] is worker (n + j) % W's latest."""
        count = self.readers_per_rank
        readers = [self._latest_states[(self._delivered + j) % count] for j in range(count)]
        return {**self.layout, "readers": readers}

    def skip_counts(self) -> dict[str, int]:
        """Skipped samples by reason, cumulative over the run (resumes included), summed over this rank's readers."""
        totals = dict.fromkeys(SKIP_REASONS, 0)
        for state in self._latest_states:
            for reason, count in state["skips"].items():
                totals[reason] = totals.get(reason, 0) + count
        return totals

    def close(self) -> None:
        """Stop the worker processes; iterating again restarts them where the stream stopped."""
        self._iterator = self._dataloader = None
