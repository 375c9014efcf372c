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

import functools
import logging
import os
import signal
import sys
from collections.abc import Iterator

import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from pipeline.data.readers import SampleReader, Source
from pipeline.data.shards import DataError, check_enough_shards, expand_shards, shard_fingerprint
from pipeline.data.skips import SKIP_REASONS, Collate, Decoder

logger = logging.getLogger(__name__)

STATE_VERSION = 1
_PR_SET_PDEATHSIG = 1  # from <linux/prctl.h>


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
