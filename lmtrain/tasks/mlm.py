"""Masked language modelling (`task.name='mlm'`): BERT's pretraining objective for encoders.

Batches are the language model's packed text (lmtrain.data.pipeline: tools/shard_data.py text shards made
with a tokenizer that has a mask token, e.g. tools/train_tokenizer.py --bert). Masking happens on device,
drawn from the step's random key, which the train step derives from (seed, step): a resumed run masks
exactly as an uninterrupted one, and the data pipeline stays the language model's.

Of the real, non-special tokens, `task.mask_prob` (15%) are chosen; each chosen token becomes the mask
token (80%), a random token (10%) or stays itself (10%), and the model predicts the original there. With
`task.whole_word_mask`, words are chosen whole: every WordPiece piece of a chosen word is predicted. The
loss is the cross-entropy summed over the chosen tokens, divided by their count over the whole global
batch (the train step divides once, after gradient accumulation).
"""

from __future__ import annotations

import dataclasses
import json
import math

import jax
import jax.numpy as jnp
import numpy as np

from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.errors import ConfigError
from lmtrain.model import ModelDef
from lmtrain.tasks.base import Task, dropout_key
from lmtrain.tasks.losses import token_loss_sums
from lmtrain.tasks.options import MlmOptions

MASK_TOKEN_RATE, RANDOM_TOKEN_RATE = 0.8, 0.1  # of the chosen tokens; the rest stay unchanged


@dataclasses.dataclass(frozen=True)
class MaskingTables:
    """What masking needs to know of the tokenizer, as lookup tables over token ids."""

    mask_id: int
    special_V: np.ndarray  # bool: never chosen ([CLS], [SEP], [PAD], ...)
    word_start_V: np.ndarray | None  # bool: the token starts a word (None: whole-word masking unavailable)

    @classmethod
    def from_tokenizer(cls, tokenizer, vocab_size: int, where: str) -> MaskingTables:
        if tokenizer.mask_token_id is None:
            raise ConfigError(f"task.name=mlm: the tokenizer {where} has no mask token. Train one with "
                              "tools/train_tokenizer.py --bert (or --mask-token [MASK]) and re-shard with it.")
        special = np.zeros(vocab_size, bool)
        special[[i for i in tokenizer.all_special_ids if i < vocab_size]] = True
        return cls(int(tokenizer.mask_token_id), special, word_starts(tokenizer, vocab_size))


def word_starts(tokenizer, vocab_size: int) -> np.ndarray | None:
    """Per token id, whether it begins a word: WordPiece marks continuations ('##'), byte-level BPE and
    SentencePiece mark starts ('Ġ', '▁'). None for a tokenizer that marks neither."""
    model = json.loads(tokenizer.backend_tokenizer.to_str()).get("model", {})
    vocab = tokenizer.get_vocab()
    starts = np.ones(vocab_size, bool)
    if model.get("type") == "WordPiece":
        prefix = model.get("continuing_subword_prefix") or "##"
        for token, i in vocab.items():
            if i < vocab_size and token.startswith(prefix):
                starts[i] = False
        return starts
    markers = ("Ġ", "▁")
    if not any(t.startswith(markers) for t in vocab):
        return None
    special = set(tokenizer.all_special_ids)
    for token, i in vocab.items():
        if i < vocab_size and i not in special and not token.startswith(markers):
            starts[i] = False
    return starts


def mask_tokens(rng: jax.Array, tokens_BxL, segment_ids_BxL, positions_BxL, tables: MaskingTables, mask_prob: float,
                vocab_size: int, whole_word: bool = False):
    """BERT masking: (inputs_BxL with the chosen tokens replaced, chosen_BxL float32 1 where the original is
    predicted). Padding (segment 0) and special tokens are never chosen."""
    choose_key, kind_key, random_key = jax.random.split(rng, 3)
    special_V = jnp.asarray(tables.special_V)
    candidate_BxL = (segment_ids_BxL > 0) & ~special_V[tokens_BxL]
    u_BxL = jax.random.uniform(choose_key, tokens_BxL.shape)
    if whole_word:
        # a word starts at a start token, at a document's first token and at a row's first token; all its
        # pieces read the uniform draw of its first piece
        starts_BxL = jnp.asarray(tables.word_start_V)[tokens_BxL] | (positions_BxL == 0)
        starts_BxL = starts_BxL.at[:, 0].set(True)
        slots_L = jnp.arange(tokens_BxL.shape[1])
        word_first_BxL = jax.lax.cummax(jnp.where(starts_BxL, slots_L, 0), axis=1)
        u_BxL = jnp.take_along_axis(u_BxL, word_first_BxL, axis=1)
    chosen_BxL = candidate_BxL & (u_BxL < mask_prob)
    kind_BxL = jax.random.uniform(kind_key, tokens_BxL.shape)
    random_BxL = jax.random.randint(random_key, tokens_BxL.shape, 0, vocab_size, dtype=tokens_BxL.dtype)
    inputs_BxL = jnp.where(kind_BxL < MASK_TOKEN_RATE, tables.mask_id,
                           jnp.where(kind_BxL < MASK_TOKEN_RATE + RANDOM_TOKEN_RATE, random_BxL, tokens_BxL))
    inputs_BxL = jnp.where(chosen_BxL, inputs_BxL, tokens_BxL).astype(tokens_BxL.dtype)
    return inputs_BxL, chosen_BxL.astype(jnp.float32)


def _eval_key(seed: int, tokens_BxL) -> jax.Array:
    """Evaluation masks the same way at every evaluation (comparable losses) and differently per batch."""
    weights_L = jnp.arange(1, tokens_BxL.shape[1] + 1, dtype=jnp.uint32)
    checksum = jnp.sum(tokens_BxL.astype(jnp.uint32) * weights_L, dtype=jnp.uint32)
    return jax.random.fold_in(jax.random.key(seed), checksum)


class MaskedLanguageModelling(Task):
    name = "mlm"
    formats = ("text",)
    head = "mlm"
    METRIC_MODES = {"val_loss": "min", "val_perplexity": "min", "val_accuracy": "max"}

    options = MlmOptions  # task.mask_prob, task.whole_word_mask

    def __init__(self, cfg):
        super().__init__(cfg)
        if cfg.data.source != "shards" or not cfg.data.tokenizer_dir:
            raise ConfigError("task.name=mlm needs data.source=shards and data.tokenizer_dir: a tokenizer with a mask "
                              "token (tools/train_tokenizer.py --bert) and text shards made with it "
                              "(tools/shard_data.py); see configs/bert_tiny.py.")
        if cfg.model.causal:
            raise ConfigError("task.name=mlm trains an encoder: set model.causal=False (a causal model cannot see the "
                              "tokens after a mask). configs/bert_tiny.py has the BERT settings.")
        self._tables: MaskingTables | None = None

    @property
    def tables(self) -> MaskingTables:
        if self._tables is None:
            where = f"data.tokenizer_dir={self.cfg.data.tokenizer_dir}"
            tables = MaskingTables.from_tokenizer(load_tokenizer(self.cfg.data.tokenizer_dir),
                                                  self.cfg.model.vocab_size, where)
            if self.cfg.task.whole_word_mask and tables.word_start_V is None:
                raise ConfigError(f"task.whole_word_mask=true, but the tokenizer {where} marks neither word starts nor "
                                  "continuations; use a WordPiece tokenizer (tools/train_tokenizer.py --bert).")
            self._tables = tables
        return self._tables

    def _masked(self, model_def: ModelDef):
        tables, vocab = self.tables, model_def.cfg.vocab_size
        mask_prob, whole_word = self.cfg.task.mask_prob, self.cfg.task.whole_word_mask

        def masked(params, batch, mask_key, drop_key):
            tokens_BxL = batch["inputs"]
            inputs_BxL, chosen_BxL = mask_tokens(mask_key, tokens_BxL, batch["segment_ids"], batch["positions"],
                                                 tables, mask_prob, vocab, whole_word)
            logits_BxLxV = model_def.apply(params, inputs_BxL, batch["positions"], batch["segment_ids"], drop_key,
                                           batch.get("token_types"))
            ce_sum, z_sum, n_chosen = token_loss_sums(logits_BxLxV, tokens_BxL, chosen_BxL, vocab)
            correct = jnp.sum((jnp.argmax(logits_BxLxV[..., :vocab], -1) == tokens_BxL) * chosen_BxL)
            return ce_sum, z_sum, n_chosen, correct

        return masked

    def loss_fn(self, model_def: ModelDef):
        masked, z_weight = self._masked(model_def), self.cfg.train.z_loss

        def loss_fn(params, batch, rng):
            mask_key, drop_key = jax.random.split(rng)
            ce_sum, z_sum, n_chosen, correct = masked(params, batch, mask_key, dropout_key(model_def.cfg, drop_key))
            return ce_sum + z_weight * z_sum, n_chosen, {"loss": ce_sum, "accuracy": correct}

        return loss_fn

    def eval_step(self, model_def: ModelDef):
        masked, seed = self._masked(model_def), self.cfg.train.seed

        def eval_step(params, batch):
            ce_sum, _, n_chosen, correct = masked(params, batch, _eval_key(seed, batch["inputs"]), None)
            return {"ce_sum": ce_sum, "tokens": n_chosen, "correct": correct}

        return eval_step

    def eval_metrics(self, sums: dict) -> dict[str, float]:
        if not float(sums.get("tokens", 0)):
            return {}
        val_loss = float(sums["ce_sum"]) / float(sums["tokens"])
        return {"val_loss": val_loss, "val_perplexity": math.exp(min(val_loss, 50.0)),
                "val_accuracy": float(sums["correct"]) / float(sums["tokens"])}
