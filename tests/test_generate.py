"""Generation: greedy ids equal transformers' `generate`, the KV cache changes nothing, seeds reproduce."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from lmtrain import generate as generate_lib
from lmtrain.generate import GenerationError, SamplingConfig, generate, sample_logits
from lmtrain.interop import hf_import
from lmtrain.interop.hf_import import load_hf_model
from lmtrain.model import ModelDef
from tests.test_hf_import import VOCAB, random_hf_model

N_NEW = 20


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def hf_and_lmtrain(request, tmp_path_factory):
    directory = tmp_path_factory.mktemp(request.param)
    model = random_hf_model(request.param, directory, seed=3)
    cfg, params = load_hf_model(directory)
    return model, ModelDef(cfg), params


def _prompts():
    rs = np.random.RandomState(0)
    return [rs.randint(0, VOCAB, n).tolist() for n in (3, 11, 6)]


def _hf_greedy(model, prompt: list[int]) -> list[int]:
    config = GenerationConfig(max_new_tokens=N_NEW, do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                             generation_config=config)
    return out[0, len(prompt):].tolist()


def test_greedy_equals_transformers_with_and_without_cache(hf_and_lmtrain):
    model, model_def, params = hf_and_lmtrain
    prompts = _prompts()  # one left-padded batch of different lengths
    sampling = SamplingConfig(max_new_tokens=N_NEW)
    cached = generate(model_def, params, prompts, sampling, use_cache=True)
    uncached = generate(model_def, params, prompts, sampling, use_cache=False)
    assert [len(t) for t in cached.tokens] == [N_NEW] * len(prompts)
    assert cached.tokens == uncached.tokens
    for prompt, ours in zip(prompts, cached.tokens, strict=True):
        assert ours == _hf_greedy(model, prompt)  # each prompt alone, unpadded, in transformers


def test_sampling_is_reproducible_with_a_seed(hf_and_lmtrain):
    _, model_def, params = hf_and_lmtrain
    sampling = SamplingConfig(max_new_tokens=N_NEW, temperature=1.0, top_k=40, top_p=0.95)
    a = generate(model_def, params, _prompts(), sampling, seed=7)
    b = generate(model_def, params, _prompts(), sampling, seed=7)
    c = generate(model_def, params, _prompts(), sampling, seed=8)
    assert a.tokens == b.tokens
    assert a.tokens != c.tokens
    assert generate(model_def, params, _prompts(), sampling, seed=7, use_cache=False).tokens == a.tokens


def test_generation_stops_at_eos_per_row(hf_and_lmtrain):
    _, model_def, params = hf_and_lmtrain
    greedy = generate(model_def, params, _prompts(), SamplingConfig(max_new_tokens=N_NEW)).tokens
    eos = greedy[1][4]
    stopped = generate(model_def, params, _prompts(), SamplingConfig(max_new_tokens=N_NEW, eos_id=eos)).tokens
    for full, cut in zip(greedy, stopped, strict=True):
        end = full.index(eos) + 1 if eos in full else len(full)
        assert cut == full[:end]
    assert len(stopped[1]) <= 5


def test_sampling_filters():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.9, -1.0]] * 256)
    keys = jax.random.split(jax.random.key(0), 1)[0]
    assert sample_logits(logits, keys, 0.0, 0, 1.0).tolist() == [1] * 256
    assert sample_logits(logits, keys, 1.0, 1, 1.0).tolist() == [1] * 256  # top-1 is greedy
    assert sample_logits(logits, keys, 1.0, 0, 1e-6).tolist() == [1] * 256  # tiny nucleus is greedy
    top2 = set(sample_logits(logits, keys, 5.0, 2, 1.0).tolist())
    assert top2 == {1, 3}
    # p(1) ~ 0.49, p(3) ~ 0.44: a 0.9 nucleus holds exactly these two tokens.
    nucleus = set(sample_logits(logits, keys, 1.0, 0, 0.9).tolist())
    assert nucleus == {1, 3}
    assert len(set(sample_logits(logits, keys, 1.0, 0, 1.0).tolist())) >= 4


def test_too_long_a_request_is_refused(hf_and_lmtrain):
    _, model_def, params = hf_and_lmtrain
    with pytest.raises(GenerationError, match="max_seq_len"):
        generate(model_def, params, [[1] * (model_def.cfg.max_seq_len - 5)], SamplingConfig(max_new_tokens=10))


def test_cli_generates_from_an_imported_workdir(tmp_path, capsys):
    hf_dir, workdir = tmp_path / "hf", tmp_path / "work"
    random_hf_model("qwen2_tied", hf_dir, tokenizer=True)
    assert hf_import.main([str(hf_dir), str(workdir)]) == 0
    argv = [str(workdir), "--prompt", "the cat", "--prompt", "once upon a time", "--max-new-tokens", "8",
            "--temperature", "0.8", "--top-k", "20", "--seed", "1", "--ignore-eos"]
    assert generate_lib.main(argv) == 0
    out = capsys.readouterr().out
    assert "16 tokens in" in out and "tokens/s" in out and "KV cache on" in out
    assert generate_lib.main([str(hf_dir), "--prompt", "a dog", "--max-new-tokens", "4", "--no-cache"]) == 0
    assert "KV cache off" in capsys.readouterr().out
