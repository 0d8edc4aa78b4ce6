"""Run a model over an encoded eval set: summed token losses (perplexity, bits per byte), class predictions,
and batched greedy KV-cache generation. Every function compiles one shape: batches are filled to a fixed
number of rows and prompts left-padded to one width, so an eval set of any size compiles once.

`generation_scores` is shared with training: the sft task calls it at each evaluation on a fixed subset of
the validation split (`task.eval_generate_examples`).
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from lmtrain.data.packing import ExamplePacker, classify_batch, pad_row, rows_dict_to_batch
from lmtrain.evaluate.examples import encode, read_eval_set
from lmtrain.evaluate.metrics import METRICS, EvalError, compute_metrics
from lmtrain.model import ModelDef
from lmtrain.model.decode import SamplingConfig, make_generate_fn, sampling_values
from lmtrain.tasks.losses import token_loss_sums

TEXT_METRICS = tuple(name for name, m in METRICS.items() if m.inputs == "text")


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def bucket_length(needed: int, cap: int, smallest: int = 16) -> int:
    """The scoring length for data that needs `needed` positions: the next power of two (at least `smallest`),
    never more than `cap` (the model's positions). Buckets bound how many shapes an eval compiles, and short data
    is not padded to a long model's whole window."""
    return min(cap, max(smallest, 1 << max(needed - 1, 0).bit_length()))


def loss_sums(model_def: ModelDef, params: dict, pieces: list[tuple[np.ndarray, np.ndarray]], row_len: int,
              batch_rows: int) -> tuple[float, int]:
    """(summed nats, scored tokens) of the pieces' targets, packed whole into rows of row_len as training packs."""
    vocab = model_def.cfg.vocab_size

    @jax.jit
    def sums(params, batch):
        logits = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
        ce, _, n = token_loss_sums(logits, batch["targets"], batch["loss_mask"], vocab)
        return ce, n

    packer = ExamplePacker(row_len)
    rows = [row for tokens, weights in pieces for row in packer.add(tokens, weights)] + packer.finish()
    nats, tokens = 0.0, 0.0
    for start in range(0, len(rows), batch_rows):
        chunk = rows[start:start + batch_rows]
        chunk += [pad_row(row_len) for _ in range(batch_rows - len(chunk))]
        ce, n = sums(params, rows_dict_to_batch(chunk))
        nats, tokens = nats + float(ce), tokens + float(n)
    return nats, int(round(tokens))


def class_probabilities(model_def: ModelDef, params: dict, inputs: list[np.ndarray], seq_len: int, batch_rows: int,
                        pad_id: int) -> np.ndarray:
    """[texts, classes] class probabilities of each text (a classifier reads its last real token)."""
    @jax.jit
    def probs_fn(params, batch):
        logits_BxC = model_def.apply(params, batch["inputs"], batch["positions"], batch["segment_ids"])
        return jax.nn.softmax(logits_BxC.astype(np.float32), axis=-1)

    probs = []
    for start in range(0, len(inputs), batch_rows):
        chunk = inputs[start:start + batch_rows]
        batch = classify_batch([(x, 0) for x in chunk], seq_len, batch_rows, pad_id)
        probs.append(np.asarray(probs_fn(params, {k: batch[k] for k in ("inputs", "positions", "segment_ids")}))
                     [: len(chunk)])
    return np.concatenate(probs) if probs else np.zeros((0, model_def.cfg.num_labels), np.float32)


@dataclasses.dataclass
class GenerationStats:
    new_tokens: int = 0  # generated, each row's EOS included
    seconds: float = 0.0  # decoding after compilation
    compile_seconds: float = 0.0

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


class Generator:
    """Greedy batched KV-cache generation (lmtrain.generate's model code) with one compiled shape: prompts are
    left-padded to `width` and each batch filled to `batch_rows` rows."""

    def __init__(self, model_def: ModelDef, width: int, max_new_tokens: int, batch_rows: int, eos_id: int | None,
                 pad_id: int):
        if width + max_new_tokens > model_def.cfg.max_seq_len:
            raise EvalError(f"the longest prompt ({width} tokens) plus {max_new_tokens} new tokens exceeds the "
                            f"model's {model_def.cfg.max_seq_len} positions; lower --max-new-tokens.")
        self.width, self.batch_rows, self.eos_id, self.pad_id = width, batch_rows, eos_id, pad_id
        self.max_new_tokens = max_new_tokens
        self.fn = make_generate_fn(model_def, max_new_tokens, pad_id)
        self.values = sampling_values(SamplingConfig(max_new_tokens, 0.0, eos_id=eos_id, pad_id=pad_id))
        self.compiled = False
        self.stats = GenerationStats()

    def __call__(self, params: dict, prompts: list[np.ndarray]) -> list[list[int]]:
        """New tokens per prompt, up to (not including) EOS."""
        out: list[list[int]] = []
        for start in range(0, len(prompts), self.batch_rows):
            chunk = list(prompts[start:start + self.batch_rows])
            rows = chunk + [chunk[-1]] * (self.batch_rows - len(chunk))  # filler rows, discarded
            tokens_BxP = np.full((self.batch_rows, self.width), self.pad_id, np.int32)
            for r, p in enumerate(rows):
                if not 0 < len(p) <= self.width:
                    raise EvalError(f"a prompt of {len(p)} tokens does not fit the generation width {self.width}.")
                tokens_BxP[r, self.width - len(p):] = p
            pad_B = np.asarray([self.width - len(p) for p in rows], np.int32)
            args = (params, tokens_BxP, pad_B, jax.random.key(0), self.values)
            if not self.compiled:
                t0 = time.perf_counter()
                self.fn = self.fn.lower(*args).compile()
                self.stats.compile_seconds += time.perf_counter() - t0
                self.compiled = True
            t0 = time.perf_counter()
            new_BxN, steps = self.fn(*args)
            new_BxN = np.asarray(jax.device_get(new_BxN))[:, : int(steps)]
            self.stats.seconds += time.perf_counter() - t0
            for row in new_BxN[: len(chunk)].tolist():
                if self.eos_id is not None and self.eos_id in row:
                    row = row[: row.index(self.eos_id) + 1]
                self.stats.new_tokens += len(row)
                out.append(row[:-1] if row and row[-1] == self.eos_id else row)
        return out


def make_generator(model_def: ModelDef, prompts: list[np.ndarray], max_new_tokens: int, batch_rows: int,
                   eos_id: int | None, pad_id: int) -> Generator:
    """A Generator whose width is the longest prompt; max_new_tokens is cut to the positions left."""
    if not prompts:
        raise EvalError("the eval set is empty (0 prompts to generate for). Give a non-empty eval set.")
    width = max(len(p) for p in prompts)
    room = model_def.cfg.max_seq_len - width
    if room < 1:
        raise EvalError(f"the longest prompt has {width} tokens, leaving no room to generate in the model's "
                        f"{model_def.cfg.max_seq_len} positions.")
    return Generator(model_def, width, min(max_new_tokens, room), batch_rows, eos_id, pad_id)


def decode_generations(tokenizer, generations: list[list[int]]) -> list[str]:
    return [tokenizer.decode(g, skip_special_tokens=True).strip() for g in generations]


def generation_scores(generations: list[str], references: list[str] | None, names=TEXT_METRICS) -> dict[str, float]:
    """BLEU, chrF, ROUGE-L and exact match (or `names` of them) of the generations against the references."""
    scores = compute_metrics("sft", list(names), generations=generations, references=references)
    return {n: scores[n] for n in names}


class ValidationGeneration:
    """The trainer's generative metrics: greedy generations for the first `n` examples of the validation split
    (a fixed subset, so evaluations compare), scored against their completions. Compiled once, at the first
    evaluation; every process calls it with the same arguments (the parameters stay sharded where they are)."""

    def __init__(self, cfg, model_def: ModelDef, tokenizer, n: int, max_new_tokens: int = 64):
        cv = (int(cfg.data.get("cv_folds", 0)), int(cfg.data.get("cv_fold", 0)))
        eval_set = read_eval_set(cfg.data.shards_dir, "validation", n, cv=cv)
        enc = encode(eval_set, tokenizer, None, model_def.cfg.vocab_size, model_def.cfg.max_seq_len + 1)
        self.prompts, self.references, self.tokenizer = enc.prompts, enc.references, tokenizer
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
        rows = round_up(min(len(self.prompts), 16), jax.device_count())  # any data-parallel layout divides it
        self.generator = make_generator(model_def, self.prompts, max_new_tokens, rows, eos, pad)

    def __call__(self, params: dict) -> dict[str, float]:
        generations = decode_generations(self.tokenizer, self.generator(params, self.prompts))
        return {f"val_{k}": v for k, v in generation_scores(generations, self.references).items()}
