"""The sft task's generative metrics, and the batched greedy generation they run on.

At each evaluation the trainer generates greedily for a fixed subset of the validation split (the first
`task.eval_generate_examples` examples) and scores the generations against their completions: BLEU, chrF,
ROUGE-L and exact match (lmtrain.tasks.scores). `lmtrain eval` generates with the same Generator.

Generation compiles one shape: prompts are left-padded to one width and each batch filled to a fixed number of
rows, so an eval set of any size compiles once.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import numpy as np

from lmtrain.data import shards
from lmtrain.errors import EvalError
from lmtrain.model import ModelDef
from lmtrain.model.decode import SamplingConfig, make_generate_fn, sampling_values
from lmtrain.tasks.scores import TEXT_SCORES


def round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


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


def generation_scores(generations: list[str], references: list[str] | None,
                      names=tuple(TEXT_SCORES)) -> dict[str, float]:
    """BLEU, chrF, ROUGE-L and exact match (or `names` of them) of the generations against the references."""
    if not generations:
        raise EvalError("the eval set is empty (0 examples to generate for). Give a non-empty eval set.")
    return {n: TEXT_SCORES[n](generations, references) for n in names}


def split_sft_example(tokens: np.ndarray, mask: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    """(prompt, completion): the tokens before the first masked one, and the first run of masked tokens."""
    masked = np.flatnonzero(mask)
    if not len(masked):
        raise EvalError(f"{where}: an example has no completion tokens (an empty loss mask).")
    start = int(masked[0])
    if start == 0:
        raise EvalError(f"{where}: the loss mask covers the whole example (shards made with --train-on-prompt), so "
                        "the prompt cannot be told from the completion; re-shard the eval data without it.")
    gaps = np.flatnonzero(mask[start:] == 0)
    end = start + int(gaps[0]) if len(gaps) else len(tokens)
    return tokens[:start], tokens[start:end]


def validation_prompts(shards_dir: str, tokenizer, n: int, cv: tuple[int, int] = (0, 0)
                       ) -> tuple[list[np.ndarray], list[str]]:
    """(prompts, reference completions) of the first `n` examples of a shard directory's validation split (with
    `cv` = (folds, fold): that held-out fold of the training split); a reference is decoded without its EOS."""
    manifest = shards.load_manifest(shards_dir)
    eos = int(manifest["eos_id"])  # what ends a completion: the id the toolchain appended (maybe an --eos-token)
    stored = shards.read_examples(shards_dir, "validation", n, manifest, *cv)
    if not stored:
        raise EvalError(f"the eval set is empty: {shards_dir} (validation split) holds no examples. "
                        "Give a non-empty eval set.")
    prompts, references = [], []
    for k, (tokens, mask, _) in enumerate(stored):
        prompt, completion = split_sft_example(tokens.astype(np.int32), mask.astype(np.float32),
                                               f"{shards_dir} (validation split), example {k}")
        if len(completion) and completion[-1] == eos:
            completion = completion[:-1]
        prompts.append(prompt)
        references.append(tokenizer.decode([int(i) for i in completion], skip_special_tokens=True).strip())
    return prompts, references


class ValidationGeneration:
    """The trainer's generative metrics: greedy generations for the first `n` examples of the validation split
    (a fixed subset, so evaluations compare), scored against their completions. Compiled once, at the first
    evaluation; every process calls it with the same arguments (the parameters stay sharded where they are)."""

    def __init__(self, cfg, model_def: ModelDef, tokenizer, n: int, max_new_tokens: int = 64):
        cv = (int(cfg.data.get("cv_folds", 0)), int(cfg.data.get("cv_fold", 0)))
        self.prompts, self.references = validation_prompts(cfg.data.shards_dir, tokenizer, n, cv)
        self.tokenizer = tokenizer
        eos = tokenizer.eos_token_id
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or 0)
        rows = round_up(min(len(self.prompts), 16), jax.device_count())  # any data-parallel layout divides it
        self.generator = make_generator(model_def, self.prompts, max_new_tokens, rows, eos, pad)

    def __call__(self, params: dict) -> dict[str, float]:
        generations = decode_generations(self.tokenizer, self.generator(params, self.prompts))
        return {f"val_{k}": v for k, v in generation_scores(generations, self.references).items()}
