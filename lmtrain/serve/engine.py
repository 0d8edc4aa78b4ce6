"""The decoding loop of `lmtrain serve`: requests that arrive together are decoded together, in waves.

Why waves and not continuous batching: the model's KV cache is written at one slot for the whole batch
(rows are left-padded to a common prompt width, as `lmtrain generate` does), so a row cannot join a batch
that is already decoding without per-row cache offsets in every block. A wave waits at most `batch_wait`
seconds after its first request for others, takes up to `max_batch` rows, prefills them together and then
decodes them together, one token per step, streaming each token as it comes. A row that ends (end token,
max_tokens, a stop string, a client gone) stops counting at once; the wave ends when all its rows have.

Nothing compiles after warm-up: the batch is padded to one of a few sizes, a prompt is left-padded to a
multiple of `chunk` and prefilled one chunk per call, each batch size keeps one cache of
`max_seq_len + chunk` slots, and sampling values, seeds, slots and steps are traced arguments
(lmtrain.generate.make_step_fns). `warm_up` compiles every program: three per batch size.
"""

from __future__ import annotations

import dataclasses
import threading
import time
from collections import deque
from collections.abc import Callable

import jax
import numpy as np

from lmtrain.data.packing import classify_batch
from lmtrain.model.decode import make_step_fns, new_cache
from lmtrain.model.transformer import ModelDef

N_TOP_LOGPROBS = 5  # the most top logprobs a request may ask for (OpenAI's completions limit)


class QueueFull(Exception):
    """More rows wait than the queue holds: the caller answers 429."""


@dataclasses.dataclass
class Row:
    """One sequence to decode: a prompt with its own sampling values."""

    prompt: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    ends: frozenset[int] = frozenset()


@dataclasses.dataclass
class TokenEvent:
    """A token of row `row` (None with `finish` set once the row is over); logprobs when asked for."""

    row: int
    token: int | None
    logprob: float = 0.0
    top: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    finish: str | None = None  # "stop" (an end token or stop string), "length" (max_tokens) or "cancelled"


@dataclasses.dataclass
class Job:
    """A request's rows; `emit(TokenEvent)` is called from the engine thread for every token and row end."""

    rows: list[Row]
    emit: Callable[[TokenEvent], None]
    cancelled: set[int] = dataclasses.field(default_factory=set)  # rows the caller no longer wants
    queued_at: float = dataclasses.field(default_factory=time.perf_counter)

    def cancel(self, row: int | None = None) -> None:
        """Stop decoding one row (a stop string was met) or all (the client went away): the slot is freed."""
        self.cancelled.update(range(len(self.rows)) if row is None else (row,))


def batch_sizes(max_batch: int) -> tuple[int, ...]:
    """The padded batch sizes waves run at: 1, then powers of 4, then max_batch."""
    sizes, size = [1], 4
    while size < max_batch:
        sizes.append(size)
        size *= 4
    return tuple(sorted(set(sizes + [max_batch])))


class Engine:
    """Runs waves on a background thread; `submit(job)` from any thread."""

    def __init__(self, model_def: ModelDef, params, *, pad_id: int, max_batch: int = 16, max_queue: int = 64,
                 batch_wait: float = 0.01, chunk: int | None = None):
        cfg = model_def.cfg
        self.max_seq_len = cfg.max_seq_len
        self.model_def, self.params, self.pad_id = model_def, params, pad_id
        self.max_batch, self.max_queue, self.batch_wait = max_batch, max_queue, batch_wait
        self.chunk = chunk or max(16, cfg.max_seq_len // 8)
        self.batches = batch_sizes(max_batch)
        self.cache_len = cfg.max_seq_len + self.chunk  # a prompt's left padding takes fewer than `chunk` slots
        self._prefill, self._decode = make_step_fns(model_def, N_TOP_LOGPROBS)
        self._empty_cache = jax.jit(new_cache, static_argnums=(0, 1, 2))
        self._compiled: dict = {}
        self._caches: dict = {}  # batch size -> its KV cache, handed from call to call (donated)
        self._waiting: deque[Job] = deque()
        self._waiting_rows = 0
        self._running_rows = 0
        self._lock = threading.Condition()
        self._stop = False
        self._thread = threading.Thread(target=self._loop, name="lmtrain-serve-engine", daemon=True)
        self.on_token: Callable[[], None] = lambda: None  # metrics hook: a token decoded (read by a client or not)

    # ------------------------------------------------------------------------------------------ lifecycle

    def warm_up(self) -> None:
        """Compile each batch size's prefill chunk, decode step and empty cache, before taking requests."""
        for batch in self.batches:
            self._program("prefill", batch)
            self._program("decode", batch)
            self._cache(batch)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._lock:
            self._stop = True
            self._lock.notify_all()
        self._thread.join(timeout=30)

    @property
    def queue_depth(self) -> int:
        return self._waiting_rows

    @property
    def running_rows(self) -> int:
        return self._running_rows

    def submit(self, job: Job) -> None:
        """Queue a job; QueueFull when its rows do not fit the queue."""
        with self._lock:
            if self._waiting_rows + len(job.rows) > self.max_queue:
                raise QueueFull(f"{self._waiting_rows} rows are waiting (the queue holds {self.max_queue})")
            self._waiting.append(job)
            self._waiting_rows += len(job.rows)
            self._lock.notify_all()

    # ------------------------------------------------------------------------------------------ programs

    def _program(self, kind: str, batch: int):
        """The compiled prefill chunk or decode step for `batch` rows; compiled on first use (warm-up)."""
        if (kind, batch) not in self._compiled:
            rows, floats = np.zeros(batch, np.int32), np.zeros(batch, np.float32)
            cache = jax.eval_shape(lambda: new_cache(self.model_def, batch, self.cache_len))
            if kind == "prefill":
                args = (self.params, cache, np.zeros((batch, self.chunk), np.int32), np.int32(0), rows, rows,
                        floats, rows, floats)
                self._compiled[kind, batch] = self._prefill.lower(*args).compile()
            else:
                args = (self.params, cache, rows, np.int32(0), rows, rows, np.int32(0), floats, rows, floats)
                self._compiled[kind, batch] = self._decode.lower(*args).compile()
        return self._compiled[kind, batch]

    def _cache(self, batch: int):
        """This batch size's cache: taken out while a wave uses it (it is donated to every call)."""
        cache = self._caches.pop(batch, None)
        return cache if cache is not None else self._empty_cache(self.model_def, batch, self.cache_len)

    # ------------------------------------------------------------------------------------------ the loop

    def _next_wave(self) -> list[Job] | None:
        """Wait for a job, then at most batch_wait for others; take jobs while their rows fit max_batch."""
        with self._lock:
            while not self._waiting and not self._stop:
                self._lock.wait(timeout=0.5)
            if self._stop and not self._waiting:
                return None
            deadline = time.perf_counter() + self.batch_wait
            while self._waiting_rows < self.max_batch and (left := deadline - time.perf_counter()) > 0:
                self._lock.wait(timeout=left)
            wave, rows = [], 0
            while self._waiting and rows + len(self._waiting[0].rows) <= self.max_batch:
                job = self._waiting.popleft()
                if len(job.cancelled) == len(job.rows):  # its client left while it waited
                    self._waiting_rows -= len(job.rows)
                    continue
                wave.append(job)
                rows += len(job.rows)
                self._waiting_rows -= len(job.rows)
            self._running_rows = rows
            return wave

    def _loop(self) -> None:
        while (wave := self._next_wave()) is not None:
            try:
                self._run_wave(wave)
            except Exception as e:  # noqa: BLE001 - a failed wave ends its requests, never the server
                for job in wave:
                    for r in range(len(job.rows)):
                        job.emit(TokenEvent(r, None, finish=f"error: {type(e).__name__}: {e}"))
            finally:
                self._running_rows = 0

    def _run_wave(self, wave: list[Job]) -> None:
        slots = [(job, r) for job in wave for r in range(len(job.rows))]
        rows = [job.rows[r] for job, r in slots]
        batch = next(b for b in self.batches if b >= len(rows))
        longest = max(len(row.prompt) for row in rows)
        width = -(-longest // self.chunk) * self.chunk
        prompt_BxP = np.full((batch, width), self.pad_id, np.int32)
        pad_B = np.full(batch, width - 1, np.int32)  # filler rows: one token, never read
        for i, row in enumerate(rows):
            prompt_BxP[i, width - len(row.prompt):] = row.prompt
            pad_B[i] = width - len(row.prompt)
        seeds, temperature, top_k, top_p = _row_values(rows, batch)
        cache = self._cache(batch)
        prefill, decode = self._program("prefill", batch), self._program("decode", batch)
        for start in range(0, width, self.chunk):
            picked, cache = prefill(self.params, cache, prompt_BxP[:, start:start + self.chunk], np.int32(start),
                                    pad_B, seeds, temperature, top_k, top_p)
        live = list(range(len(rows)))
        emitted = [0] * len(rows)
        steps = max(row.max_tokens for row in rows)
        for step in range(steps):
            next_B, chosen_B, top_BxK, top_ids_BxK = (np.asarray(x) for x in jax.device_get(picked))
            live = self._emit_step(slots, rows, live, emitted, next_B, chosen_B, top_BxK, top_ids_BxK)
            if not live or step + 1 == steps:
                break
            picked, cache = decode(self.params, cache, next_B.astype(np.int32), np.int32(width + step), pad_B,
                                   seeds, np.int32(step + 1), temperature, top_k, top_p)
        self._caches[batch] = cache

    def _emit_step(self, slots, rows, live, emitted, next_B, chosen_B, top_BxK, top_ids_BxK) -> list[int]:
        """Send each live row its token; the rows still live after it."""
        still = []
        for i in live:
            job, r = slots[i]
            if r in job.cancelled:
                job.emit(TokenEvent(r, None, finish="cancelled"))
                continue
            token = int(next_B[i])
            top = list(zip(top_ids_BxK[i].tolist(), top_BxK[i].tolist(), strict=True))
            job.emit(TokenEvent(r, token, float(chosen_B[i]), top))
            self.on_token()
            emitted[i] += 1
            if token in rows[i].ends:
                job.emit(TokenEvent(r, None, finish="stop"))
            elif emitted[i] >= rows[i].max_tokens:
                job.emit(TokenEvent(r, None, finish="length"))
            else:
                still.append(i)
        return still


def _row_values(rows: list[Row], batch: int) -> tuple[np.ndarray, ...]:
    """(seeds, temperature, top_k, top_p) per row, filler rows greedy."""
    def column(name, dtype, fill):
        out = np.full(batch, fill, dtype)
        out[: len(rows)] = [getattr(row, name) for row in rows]
        return out

    return (column("seed", np.int32, 0), column("temperature", np.float32, 0.0), column("top_k", np.int32, 0),
            column("top_p", np.float32, 1.0))


class Classifier:
    """Class probabilities for a classifier model, one request at a time, at bucketed shapes (warm-up compiles
    each: batch 1 or max_batch, widths a multiple of `chunk`)."""

    def __init__(self, model_def: ModelDef, params, *, pad_id: int, max_batch: int = 16, chunk: int | None = None):
        cfg = model_def.cfg
        self.params, self.pad_id, self.max_batch, self.max_seq_len = params, pad_id, max_batch, cfg.max_seq_len
        self.chunk = chunk or max(16, cfg.max_seq_len // 8)
        self.widths = tuple(sorted({min(w, cfg.max_seq_len) for w in range(self.chunk, cfg.max_seq_len + self.chunk,
                                                                            self.chunk)}))
        self.batches = (1, max_batch) if max_batch > 1 else (1,)
        self._apply = jax.jit(lambda p, x, pos, seg: jax.nn.softmax(model_def.apply(p, x, pos, seg).astype("float32")))
        self._lock = threading.Lock()

    def warm_up(self) -> None:
        for batch in self.batches:
            for width in self.widths:
                self.probabilities([[self.pad_id] * width] * batch)

    def probabilities(self, prompts: list[list[int]]) -> np.ndarray:
        """[prompts, classes]; prompts longer than the model are cut to its positions (--too-long truncate)."""
        longest = min(max(len(p) for p in prompts), self.max_seq_len)
        width = next(w for w in self.widths if w >= longest)
        out = []
        for start in range(0, len(prompts), self.max_batch):
            part = prompts[start:start + self.max_batch]
            rows = next(b for b in self.batches if b >= len(part))
            batch = classify_batch([(np.asarray(p, np.int32), 0) for p in part], width, rows, self.pad_id)
            with self._lock:
                probs = self._apply(self.params, batch["inputs"], batch["positions"], batch["segment_ids"])
            out.append(np.asarray(probs)[: len(part)])
        return np.concatenate(out)
