"""`lmtrain import` / `lmtrain export` of T5ForConditionalGeneration (T5 v1.0 and v1.1 / Flan-T5), built locally
from tiny random configs (no hub): the imported WORKDIR trains the seq2seq task on an lmtrain encoder-decoder
equal to transformers', and its export loads in transformers with the original's logits (within 1e-4)."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from transformers import T5Config as HFT5Config
from transformers import T5ForConditionalGeneration

from lmtrain.generate import load_model
from lmtrain.interop.families import HFInteropError
from lmtrain.interop.hf_export import export_params
from lmtrain.interop.hf_import import import_hf, next_steps
from lmtrain.model import T5Config
from lmtrain.model.decode import GenerationError
from lmtrain.model.encdec import pad_inputs
from lmtrain.workdir import Workdir

VOCAB = 96  # not a multiple of 128: the padded vocab rows are dropped again on export
VERSIONS = {
    "v1.0": dict(feed_forward_proj="relu", tie_word_embeddings=True),  # tied head, output scaled by d_model**-0.5
    "v1.1": dict(feed_forward_proj="gated-gelu", tie_word_embeddings=False, num_decoder_layers=3),  # untied head
}


def _hf_model(version: str) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    config = HFT5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=48, num_layers=2, num_heads=4,
                        relative_attention_num_buckets=8, relative_attention_max_distance=16, dropout_rate=0.0,
                        decoder_start_token_id=0, **VERSIONS[version])
    model = T5ForConditionalGeneration(config)
    if not config.scale_decoder_outputs:  # transformers 5 ties every fresh T5: give v1.1 a head of its own
        model.lm_head = torch.nn.Linear(32, VOCAB, bias=False)
        torch.nn.init.normal_(model.lm_head.weight)
    return model.eval()


def _batch():
    rng = np.random.default_rng(0)
    rows = [rng.integers(2, VOCAB, n).tolist() for n in (11, 4, 17)]
    tokens_BxS, mask_BxS = pad_inputs(rows, pad_id=0)
    dec_BxT = np.concatenate([np.zeros((3, 1), np.int32), rng.integers(2, VOCAB, (3, 6), dtype=np.int32)], axis=1)
    return tokens_BxS, mask_BxS, dec_BxT


def _hf_logits(model, tokens_BxS, mask_BxS, dec_BxT) -> np.ndarray:
    with torch.no_grad():
        out = model(input_ids=torch.as_tensor(tokens_BxS, dtype=torch.long),
                    attention_mask=torch.as_tensor(mask_BxS, dtype=torch.long),
                    decoder_input_ids=torch.as_tensor(dec_BxT, dtype=torch.long))
    return out.logits.numpy()


@pytest.mark.parametrize("version", list(VERSIONS))  # ~18 s each on 2 CPU cores
def test_import_then_export_round_trip_equals_transformers(version, tmp_path):
    hf = _hf_model(version)
    hf.save_pretrained(tmp_path / "hf")
    batch = _batch()
    want = _hf_logits(hf, *batch)

    workdir = import_hf(tmp_path / "hf", tmp_path / "work")
    written = json.loads((workdir / "config.json").read_text())
    assert written["model"]["arch"] == "t5" and written["task"]["name"] == "seq2seq"
    assert "--format sft" in next_steps(workdir)
    work = Workdir(workdir)
    cfg = work.model_config()
    assert isinstance(cfg, T5Config)
    assert cfg.tie_embeddings == (version == "v1.0") and cfg.scale_decoder_outputs == (version == "v1.0")
    assert cfg.decoder_layers == (3 if version == "v1.1" else 2)
    params = work.load_params("start")
    ours = np.asarray(work.model_def.apply(params, *batch))[..., :VOCAB]
    np.testing.assert_allclose(ours, want, atol=1e-4, rtol=1e-4)

    export_params(cfg, params, tmp_path / "out")
    exported = json.loads((tmp_path / "out" / "config.json").read_text())
    assert exported["architectures"] == ["T5ForConditionalGeneration"]
    back = T5ForConditionalGeneration.from_pretrained(tmp_path / "out").eval()
    np.testing.assert_allclose(_hf_logits(back, *batch), want, atol=1e-4, rtol=1e-4)
    if version == "v1.1":  # the untied head came back as its own tensor, not as the embedding
        assert not torch.equal(back.lm_head.weight, back.shared.weight)

    # lmtrain generate and serve run decoder-only models: a T5 (WORKDIR or HF directory) is one line, not a traceback
    with pytest.raises(GenerationError, match="encoder-decoder"):
        load_model(workdir)
    with pytest.raises(HFInteropError, match="T5ForConditionalGeneration, an encoder-decoder"):
        load_model(tmp_path / "hf")
