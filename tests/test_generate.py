"""Generation: greedy ids equal transformers' `generate`, the KV cache changes nothing, seeds reproduce."""

import re
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from transformers import GenerationConfig

from lmtrain import generate as generate_lib
from lmtrain.interop import hf_import
from lmtrain.interop.hf_import import load_hf_model
from lmtrain.model import ModelDef
from lmtrain.model.decode import GenerationError, SamplingConfig, generate, sample_logits
from tests.data.test_tokenizer_families import remote_code_tokenizer
from tests.interop.test_hf_import import VOCAB, random_hf_model

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


# ----------------------------------------------------------------------------- sampling values, prompts, stops


@pytest.mark.parametrize("option, value", [("--top-p", "0"), ("--top-p", "-0.5"), ("--top-p", "2"), ("--top-p", "nan"),
                                           ("--temperature", "nan"), ("--temperature", "-1"), ("--top-k", "-5"),
                                           ("--temperature", "inf")])
def test_bad_sampling_values_are_one_line_errors(tmp_path, capsys, option, value):
    assert generate_lib.main([str(tmp_path / "no_model"), "--prompt", "a", option, value]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"lmtrain generate: error: {option} {value.replace('inf', 'inf')}") and "\n" not in err, err


def test_a_tiny_nucleus_keeps_the_most_likely_token():
    logits = jnp.asarray([[0.0, 3.0, 1.0, 2.9, -1.0], [5.0, 0.0, 0.0, 0.0, 0.0]] * 128)
    key = jax.random.key(3)
    for top_p in (0.0, 1e-30):  # no token's mass reaches these: the top one is still kept
        assert sample_logits(logits, key, 1.0, 0, top_p).tolist() == [1, 0] * 128
        assert sample_logits(logits, key, 1.0, 2, top_p).tolist() == [1, 0] * 128


def test_a_prompt_that_is_not_utf8_is_a_one_line_error(tmp_path, capsys):
    prompt = b"caf\xe9".decode("utf-8", "surrogateescape")  # what Python makes of Latin-1 bytes in argv
    assert generate_lib.main([str(tmp_path / "no_model"), "--prompt", "fine", "--prompt", prompt]) == 2
    err = capsys.readouterr().err.strip()
    assert err == ("lmtrain generate: error: --prompt number 2 is not valid UTF-8 text (the shell passed bytes that do "
                   "not decode as UTF-8); give the prompt as UTF-8.")


def test_generation_stops_at_stop_tokens_per_row(hf_and_lmtrain):
    _, model_def, params = hf_and_lmtrain
    greedy = generate(model_def, params, _prompts(), SamplingConfig(max_new_tokens=N_NEW)).tokens
    stop_a, stop_b = greedy[1][4], greedy[0][6]
    sampling = SamplingConfig(max_new_tokens=N_NEW, eos_id=None, stop_ids=(stop_a, stop_b))
    stopped = generate(model_def, params, _prompts(), sampling).tokens
    for full, cut in zip(greedy, stopped, strict=True):
        end = min([full.index(t) + 1 for t in (stop_a, stop_b) if t in full], default=len(full))
        assert cut == full[:end]
    assert len(stopped[1]) <= 5 and len(stopped[0]) <= 7


def _chat_hf_model(directory):
    """A random Qwen2 model whose word-level tokenizer covers its whole vocabulary (so every generated token prints)
    and has a ChatML template with its <|im_end|> token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    random_hf_model("qwen2_tied", directory)
    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>"]
    vocab = {t: i for i, t in enumerate(specials + [f"w{i}" for i in range(len(specials), VOCAB)])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tok = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>", pad_token="<pad>",
                                  additional_special_tokens=specials[3:])
    tok.chat_template = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
    tok.save_pretrained(str(directory))
    return tok


def _printed(out: str) -> list[str]:
    """The generations `lmtrain generate` printed, one per prompt (the lines after each '--- prompt' header)."""
    blocks = out.split("--- ")[1:]
    return [b.split("\n", 1)[1].rsplit("\nlmtrain generate:", 1)[0].rstrip("\n") for b in blocks]


def test_stop_strings_end_the_printed_generation_and_chat_models_stop_at_end_of_turn(tmp_path, capsys):
    hf_dir = tmp_path / "hf"
    tok = _chat_hf_model(hf_dir)
    argv = [str(hf_dir), "--prompt", "w7 w9", "--max-new-tokens", "12"]
    assert generate_lib.main([*argv, "--ignore-eos"]) == 0
    (full,) = _printed(capsys.readouterr().out)
    new = full[len("w7 w9"):]
    words = re.findall(r"w\d+|<[^>]+>", new)
    assert len(words) == 12
    k = next(i for i, w in enumerate(words) if w != words[0])
    stop = words[k]  # one token of the vocabulary: the decoding loop itself stops there
    assert generate_lib.main([*argv, "--ignore-eos", "--stop", stop, "--stop", "never"]) == 0
    out = capsys.readouterr().out
    assert _printed(out) == ["w7 w9" + new[: new.index(stop)]] and stop not in _printed(out)[0][5:]
    assert f"generate: {k + 1} tokens in" in out
    stop = new[1:4]  # not a token: the printed text is cut before it
    assert generate_lib.main([*argv, "--ignore-eos", "--stop", stop]) == 0
    assert _printed(capsys.readouterr().out) == ["w7 w9" + new[:1]]

    # the chat template's end-of-turn token is a default stop (a single token: the decoding loop stops at it)
    tokenizer = generate_lib._Tokenizer(hf_dir)
    args = generate_lib.argparse.Namespace(stop=["###"], ignore_eos=False)
    assert generate_lib.stop_strings(args, hf_dir, tokenizer) == ["###", "<|im_end|>"]
    assert tokenizer.token_id("<|im_end|>") == tok.convert_tokens_to_ids("<|im_end|>")
    plain = tmp_path / "plain"
    random_hf_model("qwen2_tied", plain, tokenizer=True)
    assert generate_lib.stop_strings(args, plain, generate_lib._Tokenizer(plain)) == ["###"]
    assert generate_lib.cut_at_stop("a reply<|im_end|>\n<|im_start|>user", ["<|im_end|>", "user"]) == "a reply"


def test_a_workdir_trained_on_chat_shards_stops_at_the_templates_end_of_turn(tmp_path):
    """The template recorded in the shards' manifest (tools/shard_data.py keeps it in the fingerprint) counts."""
    import json

    shards = tmp_path / "shards"
    shards.mkdir()
    template = "{% for m in messages %}<|im_start|>{{ m['content'] }}<|im_end|>{% endfor %}"
    (shards / "manifest.json").write_text(json.dumps({"fingerprint": {"chat_template": template}}))
    workdir = tmp_path / "work"
    workdir.mkdir()
    (workdir / "config.json").write_text(json.dumps({"data": {"shards_dir": str(shards)}}))
    assert generate_lib.workdir_chat_template(workdir) == template
    (shards / "manifest.json").write_text(json.dumps({"chat_template": template}))
    assert generate_lib.workdir_chat_template(workdir) == template
    vocab = {"<|im_end|>": 7}
    assert generate_lib.end_of_turn_tokens(template, vocab.get) == ["<|im_end|>"]
    assert generate_lib.end_of_turn_tokens(template, {}.get) == []  # not one token of this vocabulary


def test_generate_on_a_classifier_prints_the_label_and_class_probabilities(tmp_path, capsys):
    from tests.interop.test_hf_classifier import LABELS, random_hf_classifier
    from tests.interop.test_hf_import import tiny_tokenizer

    hf_dir, workdir = tmp_path / "hf", tmp_path / "work"
    model = random_hf_classifier("qwen2", hf_dir)
    tok = tiny_tokenizer()
    tok.save_pretrained(str(hf_dir))
    assert hf_import.main([str(hf_dir), str(workdir)]) == 0
    capsys.readouterr()
    prompts = ["the cat sat on the mat", "a dog"]
    for path in (workdir, hf_dir):
        assert generate_lib.main([str(path), "--prompt", prompts[0], "--prompt", prompts[1]]) == 0
        out = capsys.readouterr().out
        for prompt, block in zip(prompts, out.split("--- ")[1:], strict=True):
            with torch.no_grad():
                ids = torch.tensor([tok.encode(prompt)])
                want = torch.softmax(model(input_ids=ids).logits.float(), -1)[0].numpy()
            lines = block.strip().splitlines()
            assert lines[0] == repr(prompt)
            best = int(np.argmax(want))
            assert lines[1] == f"label: {LABELS[best]} (p={want[best]:.3f})"
            shown = {line.split()[0]: float(line.split()[1]) for line in lines[2:]}
            assert shown == pytest.approx(dict(zip(LABELS, want.tolist())), abs=2e-3)


def test_other_sampling_values_reuse_the_compiled_program(hf_and_lmtrain):
    """Temperature, top-k, top-p and the end tokens are traced arguments: only shapes compile (the server relies
    on it: no request compiles after warm-up)."""
    _, model_def, params = hf_and_lmtrain
    first = generate(model_def, params, _prompts(), SamplingConfig(max_new_tokens=N_NEW, temperature=0.7, eos_id=5))
    again = generate(model_def, params, _prompts(), SamplingConfig(max_new_tokens=N_NEW, temperature=1.3, top_k=7,
                                                                   top_p=0.5, eos_id=9))
    greedy = generate(model_def, params, _prompts(), SamplingConfig(max_new_tokens=N_NEW, eos_id=9))
    assert first.compile_seconds >= 0 and again.compile_seconds == 0 and greedy.compile_seconds == 0
    plain = generate(model_def, params, _prompts(), SamplingConfig(max_new_tokens=N_NEW)).tokens
    assert greedy.tokens == [t[: t.index(9) + 1] if 9 in t else t for t in plain]  # the traced end token counts


def test_a_tokenizer_that_needs_its_own_code_is_a_one_line_error(tmp_path, capsys):
    """generate loads tokenizers through lmtrain's one loader: a directory asking for its own tokenization code is
    refused in one line, and the code never runs (it used to fall back to tokenizer.json and generate)."""
    hf_dir, workdir, marker = tmp_path / "hf", tmp_path / "work", tmp_path / "MARKER"
    random_hf_model("qwen2_tied", hf_dir, tokenizer=True)
    assert hf_import.main([str(hf_dir), str(workdir)]) == 0
    shutil.rmtree(workdir / "tokenizer")
    remote_code_tokenizer(workdir / "tokenizer", marker)
    capsys.readouterr()
    assert generate_lib.main([str(workdir), "--prompt", "the cat", "--max-new-tokens", "2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(workdir / "tokenizer") in err and "own Python code" in err
    assert not marker.exists()
