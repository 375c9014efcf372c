"""Batched generation for the server: one thread runs the model; concurrent requests share its `generate` calls.

Requests arrive already tokenized (`Request`). The engine thread takes the first waiting request, then collects more
for up to `batch_window_s` or until `max_batch_size`, and runs them as one left-padded batch per sampling setting
(greedy, or one temperature/top-p pair). A `RowTracker`, called by `generate` after every step, hands each row's new
token to its request: it decodes the text so far, sends what is certain to the request's event queue (held back: a
trailing partial character, trailing whitespace, the start of a stop string), and ends the row at a terminator, a stop
string or the request's own token budget, so short answers do not wait for long ones to be cut. Answers are stripped
of surrounding whitespace, as the pipeline's are. Nothing here imports the training code: only transformers' model.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

import torch
from transformers import StoppingCriteria, StoppingCriteriaList

log = logging.getLogger(__name__)


@dataclass
class Request:
    """One chat completion: its prompt ids, image, budget and sampling, and where its events go."""

    input_ids: list[int]
    pixel_values: torch.Tensor | None  # [1, 3, H, W] or None for a text-only prompt
    max_new_tokens: int
    temperature: float = 0.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    loop: asyncio.AbstractEventLoop | None = None
    events: asyncio.Queue | None = None
    cancelled: bool = False
    # Filled while generating.
    tokens: list[int] = field(default_factory=list)
    sent: str = ""
    text: str = ""
    finish_reason: str | None = None
    submitted_s: float = field(default_factory=time.monotonic)

    @property
    def sampling(self) -> tuple:
        return (False, 1.0, 1.0) if self.temperature <= 0 else (True, self.temperature, self.top_p)

    def emit(self, event: tuple) -> None:
        if self.loop is not None and self.events is not None:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class RowTracker(StoppingCriteria):
    """Per-row bookkeeping inside `generate`: new tokens, text deltas, and which rows are finished."""

    def __init__(self, requests: list[Request], tokenizer, stop_ids: set[int]):
        self.requests, self.tokenizer, self.stop_ids = requests, tokenizer, stop_ids

    def __call__(self, input_ids: torch.LongTensor, scores, **kwargs) -> torch.BoolTensor:
        last = input_ids[:, -1].tolist()
        for request, token in zip(self.requests, last, strict=True):
            if request.finish_reason is not None:
                continue
            if request.cancelled:
                request.finish_reason = "cancelled"
            elif token in self.stop_ids:
                self.finish(request, "stop")
            else:
                request.tokens.append(token)
                if self.update(request):
                    self.finish(request, "stop")
                elif len(request.tokens) >= request.max_new_tokens:
                    self.finish(request, "length")
        return torch.tensor([r.finish_reason is not None for r in self.requests], device=input_ids.device)

    def update(self, request: Request, final: bool = False) -> bool:
        """Decode the row, send the certain part of its text; True when a stop string ended it."""
        text = self.tokenizer.decode(request.tokens, skip_special_tokens=True).lstrip()
        cuts = [text.find(stop) for stop in request.stop if stop and stop in text]
        stopped = bool(cuts)
        if stopped:
            text = text[: min(cuts)]
        if final or stopped:
            visible = text.rstrip()
        else:
            visible = text.rstrip("\ufffd")  # a character whose bytes are not all generated yet
            visible = visible[: len(visible) - _stop_prefix_length(visible, request.stop)].rstrip()
        request.text = text.rstrip()
        if visible.startswith(request.sent) and len(visible) > len(request.sent):
            request.emit(("delta", visible[len(request.sent) :]))
            request.sent = visible
        return stopped

    def finish(self, request: Request, reason: str) -> None:
        self.update(request, final=True)
        request.finish_reason = reason
        request.emit(("done", reason))

    def finish_all(self) -> None:
        for request in self.requests:
            if request.finish_reason is None:
                self.finish(request, "length")


def _stop_prefix_length(text: str, stops: list[str]) -> int:
    """How many characters at the end of `text` could be the start of a stop string."""
    longest = 0
    for stop in stops:
        for length in range(min(len(stop) - 1, len(text)), longest, -1):
            if text.endswith(stop[:length]):
                longest = length
                break
    return longest


@dataclass
class EngineStats:
    batches: int = 0
    requests: int = 0
    largest_batch: int = 0


class Engine:
    """Owns the model on one thread; `submit` queues a request from any thread."""

    def __init__(self, model, processor, max_batch_size: int = 32, batch_window_s: float = 0.01):
        self.model, self.processor = model, processor
        self.max_batch_size, self.batch_window_s = max_batch_size, batch_window_s
        config = model.generation_config
        stops = config.eos_token_id if isinstance(config.eos_token_id, list) else [config.eos_token_id]
        self.stop_ids = {int(token) for token in stops if token is not None}
        self.pad_id = processor.pad_token_id
        self.device = next(model.parameters()).device
        self.stats = EngineStats()
        self._queue: queue.Queue[Request | None] = queue.Queue()
        self._thread = threading.Thread(target=self._run, name="generation", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._queue.put(None)
        self._thread.join(timeout=30)

    def submit(self, request: Request) -> None:
        self._queue.put(request)

    def _collect(self) -> list[Request] | None:
        first = self._queue.get()
        if first is None:
            return None
        batch = [first]
        deadline = time.monotonic() + self.batch_window_s
        while len(batch) < self.max_batch_size:
            remaining = deadline - time.monotonic()
            try:
                request = self._queue.get(timeout=max(remaining, 0)) if remaining > 0 else self._queue.get_nowait()
            except queue.Empty:
                break
            if request is None:
                self._queue.put(None)  # stop after this batch
                break
            batch.append(request)
        return batch

    def _run(self) -> None:
        while (batch := self._collect()) is not None:
            groups: dict[tuple, list[Request]] = {}
            for request in batch:
                if not request.cancelled:
                    groups.setdefault(request.sampling, []).append(request)
            for sampling, requests in groups.items():
                try:
                    self.generate(requests, sampling)
                except Exception as error:  # the server keeps serving; these requests get the error
                    log.exception("generation failed for a batch of %d", len(requests))
                    for request in requests:
                        if request.finish_reason is None:
                            request.finish_reason = "error"
                            request.emit(("error", f"generation failed: {type(error).__name__}: {error}"))

    @torch.no_grad()
    def generate(self, requests: list[Request], sampling: tuple) -> None:
        """One batched `generate` call for requests of the same sampling setting."""
        width = max(len(request.input_ids) for request in requests)
        input_ids = torch.full((len(requests), width), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        for row, request in enumerate(requests):
            input_ids[row, width - len(request.input_ids) :] = torch.tensor(request.input_ids)
            attention_mask[row, width - len(request.input_ids) :] = 1
        images = [request.pixel_values for request in requests if request.pixel_values is not None]
        pixel_values = torch.cat(images).to(self.device) if images else None
        do_sample, temperature, top_p = sampling
        options = {"do_sample": True, "temperature": temperature, "top_p": top_p} if do_sample else {}
        tracker = RowTracker(requests, self.processor.tokenizer, self.stop_ids)
        self.stats.batches += 1
        self.stats.requests += len(requests)
        self.stats.largest_batch = max(self.stats.largest_batch, len(requests))
        self.model.generate(
            input_ids=input_ids.to(self.device),
            attention_mask=attention_mask.to(self.device),
            pixel_values=pixel_values,
            max_new_tokens=max(request.max_new_tokens for request in requests),
            stopping_criteria=StoppingCriteriaList([tracker]),
            **options,
        )
        tracker.finish_all()


def load(model_dir: str, device: str, dtype: str = "auto"):
    """The exported model (eval mode, on `device`) and its processor, through transformers alone."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch_dtype = "auto" if dtype == "auto" else getattr(torch, dtype)
    model = AutoModelForImageTextToText.from_pretrained(model_dir, trust_remote_code=True, dtype=torch_dtype)
    processor = AutoProcessor.from_pretrained(model_dir, trust_remote_code=True)
    return model.to(device).eval(), processor
