"""span_corruption: T5's objective. The encoder row and the decoder target together give the original text back
(each sentinel in the input stands for the tokens behind it in the target), with T5's counts of hidden tokens
and spans; the same key draws the same spans; a tokenizer without sentinels is an error that names it."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lmtrain.data.packing import DataError
from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.tasks.span_corruption import corrupt_rows, sentinel_ids, span_counts
from lmtrain.train.trainer import train
from tests.helpers import small_config

EOS, PAD = 1, 0
SENTINELS = np.arange(200, 230, dtype=np.int32)  # ids no text token has


def _restore(enc, dec) -> list[int]:
    """The text a (corrupted input, target) pair encodes: each input sentinel replaced by its span in the target."""
    spans, current = {}, None
    for tok in dec:
        if tok == EOS:
            break
        if tok in SENTINELS:
            current = int(tok)
            spans[current] = []
        else:
            spans[current].append(int(tok))
    out = []
    for tok in enc:
        if tok == EOS:
            break
        out += spans[int(tok)] if tok in SENTINELS else [int(tok)]
    return out


@pytest.mark.parametrize("length,density,mean", [(32, 0.15, 3.0), (64, 0.3, 2.0), (17, 0.5, 1.0)])
def test_input_and_target_give_the_text_back_with_t5s_counts(length, density, mean):
    rng = np.random.default_rng(length)
    tokens = rng.integers(2, 150, (4, length)).astype(np.int32)
    enc, enc_valid, dec, dec_valid = jax.jit(corrupt_rows, static_argnums=(3, 4, 5, 6))(
        jax.random.key(0), tokens, SENTINELS, density, mean, EOS, PAD)
    enc, enc_valid, dec, dec_valid = map(np.asarray, (enc, enc_valid, dec, dec_valid))
    n_noise, n_spans = span_counts(length, density, mean)
    for row in range(4):
        assert _restore(enc[row], dec[row]) == tokens[row].tolist()
        hidden = [t for t in dec[row][dec_valid[row]] if t not in SENTINELS and t != EOS]
        assert len(hidden) == n_noise
        assert np.isin(enc[row][enc_valid[row]], SENTINELS).sum() == n_spans
        assert enc_valid[row].sum() == length - n_noise + n_spans + 1  # the static lengths are filled exactly
        assert dec_valid[row].sum() == n_noise + n_spans + 1
    assert len({tuple(r) for r in dec}) > 1  # each row draws its own spans
    again = corrupt_rows(jax.random.key(0), tokens, SENTINELS, density, mean, EOS, PAD)[0]
    np.testing.assert_array_equal(np.asarray(again), enc)


def test_a_tokenizer_without_sentinels_is_an_error_naming_it(tokenizer_512):
    with pytest.raises(DataError, match=f"tokenizer {tokenizer_512} has 0 sentinel tokens.*--special-tokens"):
        sentinel_ids(load_tokenizer(tokenizer_512), 5, tokenizer_512)


def _losses(workdir) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.heavy  # ~2 min on 2 busy CPU cores; the corruption itself is tested above
@pytest.mark.usefixtures("compile_cache")
def test_pretraining_on_packed_text_lowers_the_loss_and_resume_equals_straight(tmp_path_factory, tmp_path):
    from tools import train_tokenizer

    tok = tmp_path_factory.mktemp("sentinels") / "tokenizer"
    sentinels = [f"<extra_id_{i}>" for i in range(8)]
    assert train_tokenizer.main(["--builtin", "--max-docs", "150", "--vocab-size", "512", "--special-tokens",
                                 *sentinels, "--output", str(tok)]) == 0

    def cfg():
        return small_config("llama", **{
            "task.name": "span_corruption", "model.vocab_size": 512, "data.max_docs": 40, "data.tokenizer_dir": str(tok),
            "model.arch": "t5", "model.mlp": "gated-gelu", "model.head_dim": 16, "model.relative_buckets": 8,
            "model.relative_max_distance": 16, "optimizer.lr": 3e-3, "train.steps": 6, "train.log_every": 1,
            "train.eval_every": 2, "train.eval_batches": 1, "checkpoint.every": 2, "checkpoint.keep": 1})

    straight = train(cfg(), tmp_path / "straight")
    losses = _losses(tmp_path / "straight")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert sum(losses[s] for s in (5, 6)) / 2 < losses[1] - 0.3, losses
    train(cfg(), tmp_path / "resumed", stop_at_step=2)
    resumed = train(cfg(), tmp_path / "resumed")
    assert _losses(tmp_path / "resumed") == losses
    assert resumed.metrics["val_loss"] == straight.metrics["val_loss"]
