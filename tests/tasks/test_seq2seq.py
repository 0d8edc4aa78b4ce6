"""The seq2seq task: sft records (prompt -> encoder, completion -> decoder target) on lmtrain's T5, packed whole.
The loss falls on the target tokens only and equals the cross-entropy of each example computed alone; a few
steps on the built-in SFT demo lower it, and a resumed run equals a straight one."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest
import torch
from transformers import T5ForConditionalGeneration

from lmtrain.data.packing import ExamplePacker, rows_dict_to_batch
from lmtrain.errors import ConfigError
from lmtrain.evaluate import cli as eval_cli
from lmtrain.interop.hf_export import export_workdir
from lmtrain.model import T5ModelDef
from lmtrain.tasks import make_task
from lmtrain.train.trainer import train
from lmtrain.workdir import Workdir
from tests.helpers import small_config

T5_MODEL = {"model.arch": "t5", "model.mlp": "gated-gelu", "model.n_layers": 2, "model.n_decoder_layers": 2,
            "model.head_dim": 16, "model.relative_buckets": 8, "model.relative_max_distance": 32,
            "model.pad_id": 0, "model.eos_id": 0, "model.decoder_start_id": 0}


@pytest.fixture(scope="module")
def sft_shards(builtin_shards, tmp_path_factory):
    """The built-in SFT demo (signature -> docstring summary) sharded with the toolchain's tokenizer."""
    from tools import shard_data

    tok, _ = builtin_shards
    out = tmp_path_factory.mktemp("seq2seq") / "sft"
    assert shard_data.main(["--builtin-task", "sft", "--tokenizer", tok, "--output", str(out), "--seq-len", "32",
                            "--quiet"]) == 0
    return tok, str(out)


def _cfg(tok="", shards="", **kw):
    values = {"task.name": "seq2seq", "data.source": "shards", "data.tokenizer_dir": tok, "data.shards_dir": shards,
              "model.vocab_size": 1024, "data.seq_len": 32, "model.max_seq_len": 32, "train.steps": 6,
              "train.log_every": 1, "train.eval_every": 2, "train.eval_batches": 2, "checkpoint.every": 2,
              "checkpoint.keep": 1, "optimizer.lr": 3e-3, **T5_MODEL}
    values.update(kw)
    return small_config("llama", **values)


def _log_softmax(logits_TxV):
    shifted = logits_TxV - logits_TxV.max(-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))


def test_packed_loss_is_the_target_cross_entropy_of_each_example_alone():
    """Three examples packed in one row: the task's loss sum is sum -log p(completion | prompt) of each example run
    alone (encoder: the prompt; decoder: the start token and the completion), and its weight the target count."""
    cfg = _cfg(**{"model.vocab_size": 96})
    task = make_task(cfg)
    model_def = T5ModelDef(task.model_config())
    params = model_def.init(jax.random.key(0))
    rng = np.random.default_rng(0)
    examples = [(rng.integers(1, 96, p), rng.integers(1, 96, c)) for p, c in ((5, 4), (3, 6), (7, 2))]
    packer = ExamplePacker(row_len=33)
    rows = [row for prompt, completion in examples
            for row in packer.add(np.concatenate([prompt, completion]),
                                  np.concatenate([np.zeros(len(prompt)), np.ones(len(completion))]))]
    rows += packer.finish()
    assert len(rows) == 1  # all three share the row
    batch = rows_dict_to_batch(rows)

    loss_sum, weight, _ = jax.jit(task.loss_fn(model_def))(params, batch, jax.random.key(1))

    want = 0.0
    for prompt, completion in examples:
        dec_in = np.concatenate([[0], completion[:-1]])[None]
        logits = np.asarray(model_def.apply(params, prompt[None], np.ones((1, len(prompt)), bool), dec_in))
        logp = _log_softmax(logits[0, :, :96].astype(np.float64))
        want -= logp[np.arange(len(completion)), completion].sum()
    assert float(weight) == sum(len(c) for _, c in examples)  # the targets only, never a prompt token
    np.testing.assert_allclose(float(loss_sum), want, rtol=1e-5)


def test_seq2seq_needs_model_arch_t5_and_an_encoder_decoder_needs_its_task():
    with pytest.raises(ConfigError, match="model.arch='t5'"):
        make_task(_cfg(**{"model.arch": "transformer", "model.mlp": "swiglu"})).model_config()
    with pytest.raises(ConfigError, match="task.name=seq2seq or span_corruption"):
        make_task(_cfg(**{"task.name": "lm"})).model_config()


def _losses(workdir) -> dict[int, float]:
    records = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if "loss" in r}


@pytest.mark.heavy  # ~2 min on 2 busy CPU cores; the packed-loss test above covers the step's batch and loss
@pytest.mark.usefixtures("compile_cache")
def test_a_few_steps_lower_the_loss_resume_equals_straight_and_eval_and_export_read_it(sft_shards, tmp_path):
    tok, shards = sft_shards
    straight = train(_cfg(tok, shards), tmp_path / "straight")
    losses = _losses(tmp_path / "straight")
    assert sorted(losses) == [1, 2, 3, 4, 5, 6]
    assert sum(losses[s] for s in (5, 6)) / 2 < losses[1] - 0.3, losses
    assert straight.metrics["val_loss"] < losses[1]
    # lmtrain eval: the generic path, this task's eval step summed over the whole split
    assert eval_cli.main([str(tmp_path / "straight"), "--data", shards, "--split", "validation"]) == 0
    report = json.loads((tmp_path / "straight" / "eval" / "validation-step6" / "eval.json").read_text())
    assert report["result"]["task"] == "seq2seq" and 0 < report["result"]["metrics"]["loss"] < losses[1]
    assert (tmp_path / "straight" / "eval" / "validation-step6" / "report.html").exists()
    # lmtrain export: the trained encoder-decoder loads in transformers and computes what lmtrain does
    work = Workdir(tmp_path / "straight")
    export_workdir(work.path, tmp_path / "hf")
    hf = T5ForConditionalGeneration.from_pretrained(tmp_path / "hf").eval()
    prompt, completion = np.arange(5, 12)[None], np.arange(20, 26)[None]
    dec_in = np.concatenate([[[0]], completion[:, :-1]], axis=1)
    ours = np.asarray(work.model_def.apply(work.load_params(), prompt, np.ones_like(prompt, bool), dec_in))
    with torch.no_grad():
        theirs = hf(input_ids=torch.as_tensor(prompt), decoder_input_ids=torch.as_tensor(dec_in)).logits.numpy()
    np.testing.assert_allclose(ours[..., :1024], theirs, atol=1e-4, rtol=1e-4)

    train(_cfg(tok, shards), tmp_path / "resumed", stop_at_step=2)
    resumed = train(_cfg(tok, shards), tmp_path / "resumed")
    assert _losses(tmp_path / "resumed") == losses
    assert resumed.metrics["val_loss"] == straight.metrics["val_loss"]
