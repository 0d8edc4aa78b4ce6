"""`lmtrain eval` end to end on small trained WORKDIRs: perplexity and bits per byte by hand, classification
scores by hand, batched generation equal to unbatched lmtrain.generate, the baseline side by side, the
classifier at its start, sharded equals one device, gs:// WORKDIRs, the trainer's generative metrics, and
one-line errors for bad input."""

import json
import math
import os

import jax
import numpy as np
import pytest

from lmtrain.data.tokenizer import load_tokenizer
from lmtrain.evaluate import cli
from lmtrain.evaluate import examples as examples_lib
from lmtrain.evaluate.model import load_eval_model
from lmtrain.paths import as_path
from lmtrain.tasks.scores import bleu, chrf, exact_match, rouge_l
from tests.data.test_tokenizer_families import FAMILIES
from tests.helpers import small_config
from tools import shard_data

LN2 = math.log(2.0)


@pytest.fixture(scope="module")
def task_data(builtin_shards, tmp_path_factory):
    """(tokenizer, text shards, sft shards, classify shards), the demos cut for 32-token sequences."""
    from tools import shard_data

    tok, text = builtin_shards
    root = tmp_path_factory.mktemp("eval_tasks")
    for task in ("sft", "classify"):
        assert shard_data.main(["--builtin-task", task, "--tokenizer", tok, "--output", str(root / task),
                                "--seq-len", "32", "--quiet"]) == 0
    return tok, text, str(root / "sft"), str(root / "classify")


def _cfg(tok, shards, **kw):
    values = {"model.vocab_size": 1024, "data.seq_len": 32, "model.max_seq_len": 48, "data.tokenizer_dir": tok,
              "data.source": "shards", "data.shards_dir": shards, "train.steps": 3, "train.eval_every": 0,
              "checkpoint.every": 3, "optimizer.lr": 3e-3}
    values.update(kw)
    return small_config("llama", **values)


@pytest.fixture(scope="module")
def workdirs(task_data, tmp_path_factory):
    """A language model, and an sft model and a classifier started from it (a few steps each)."""
    from lmtrain.train.trainer import train

    tok, text, sft, classify = task_data
    root = tmp_path_factory.mktemp("eval_workdirs")
    train(_cfg(tok, text), root / "lm")
    train(_cfg(tok, sft, **{"task.name": "sft", "train.init_from": str(root / "lm"), "train.steps": 4,
                            "train.eval_every": 2, "train.eval_batches": 2, "checkpoint.every": 2,
                            "task.eval_generate_examples": 4}), root / "sft")
    train(_cfg(tok, classify, **{"task.name": "classify", "train.init_from": str(root / "lm")}), root / "classify")
    return {name: str(root / name) for name in ("lm", "sft", "classify")}


def run_eval(capsys, *argv) -> dict:
    assert cli.main([str(a) for a in argv]) == 0, capsys.readouterr().err
    out = capsys.readouterr().out
    path = out.rsplit("lmtrain eval: wrote ", 1)[1].split(" and ")[0]
    return json.loads(as_path(path).read_text())


def eval_error(capsys, *argv) -> str:
    assert cli.main([str(a) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("lmtrain eval: error: ") and "Traceback" not in err, err
    return err


def _ce_of_window(model_def, params, window: np.ndarray) -> float:
    """Summed cross-entropy of window[1:] given window[:-1], unbatched and unpacked."""
    logits = np.asarray(model_def.apply(params, window[None, :-1]))[0, :, : model_def.cfg.vocab_size]
    logits = logits.astype(np.float64)
    log_z = np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1)) + logits.max(-1)
    return float(np.sum(log_z - logits[np.arange(len(window) - 1), window[1:]]))


# ----------------------------------------------------------------------------- language modelling


@pytest.mark.slow
def test_perplexity_and_bits_per_byte_by_hand_and_raw_text_equals_shards(workdirs, task_data, tmp_path, capsys):
    from lmtrain.data import shards

    tok, text, _, _ = task_data
    doc = run_eval(capsys, workdirs["lm"], "--data", text, "--split", "validation", "--max-examples", 3,
                   "--out", tmp_path / "shards")
    m = doc["result"]["metrics"]
    model = load_eval_model(workdirs["lm"], mesh_shape=(1, 1, 1))
    manifest = shards.load_manifest(text)
    source = shards.split_source(text, "validation")
    nats, n_tokens, n_bytes, texts = 0.0, 0, 0, []
    for i in range(3):
        ids = np.frombuffer(source[i], "<u2").astype(np.int32)[:-1]  # the EOS the toolchain appended
        for start in range(0, len(ids) - 1, 48):  # windows of the model's 48 positions, one token overlap
            nats += _ce_of_window(model.model_def, model.params, ids[start:start + 49])
        n_tokens += len(ids) - 1  # as in training, the first token of a document is not predicted
        texts.append(model.tokenizer.decode(ids.tolist()))
        n_bytes += len(texts[-1].encode("utf-8")) - len(model.tokenizer.decode(ids[:1].tolist()).encode("utf-8"))
    assert manifest["eos_id"] == model.tokenizer.eos_token_id
    assert model.tokenizer("", add_special_tokens=True)["input_ids"] == []  # this tokenizer adds no BOS
    assert m["tokens"] == n_tokens and m["bytes"] == n_bytes
    assert m["loss"] == pytest.approx(nats / n_tokens, rel=1e-5)
    assert m["perplexity"] == pytest.approx(math.exp(nats / n_tokens), rel=1e-5)
    assert m["bits_per_byte"] == pytest.approx(nats / (n_bytes * LN2), rel=1e-5)

    raw = tmp_path / "docs.jsonl"
    raw.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    again = run_eval(capsys, workdirs["lm"], "--data", raw, "--out", tmp_path / "raw")["result"]["metrics"]
    assert again["tokens"] == m["tokens"] and again["bytes"] == m["bytes"]
    assert again["bits_per_byte"] == pytest.approx(m["bits_per_byte"], rel=1e-6)


@pytest.mark.slow
def test_a_hugging_face_export_evaluates_like_its_workdir(workdirs, task_data, tmp_path, capsys):
    """`lmtrain eval HF_DIR`: the `lmtrain export` of the language model scores the same perplexity as the WORKDIR
    (same weights, same tokens), on text shards and on raw text."""
    from lmtrain.interop import hf_export

    _, text, _, _ = task_data
    hf = tmp_path / "hf"
    assert hf_export.main([workdirs["lm"], str(hf)]) == 0
    args = ("--data", text, "--split", "validation", "--max-examples", 3, "--mesh", "1,1,1")
    mine = run_eval(capsys, workdirs["lm"], *args, "--out", tmp_path / "workdir")["result"]
    theirs = run_eval(capsys, hf, *args, "--out", tmp_path / "hf_eval")
    assert (tmp_path / "hf_eval" / "eval.json").is_file()
    assert theirs["result"]["checkpoint"] == "the Hugging Face weights" and mine["checkpoint"].startswith("step 3")
    m, w = theirs["result"]["metrics"], mine["metrics"]
    assert math.isfinite(m["perplexity"]) and m["perplexity"] > 1
    assert m["tokens"] == w["tokens"] and m["bytes"] == w["bytes"]
    assert m["perplexity"] == pytest.approx(w["perplexity"], rel=1e-4)
    assert m["bits_per_byte"] == pytest.approx(w["bits_per_byte"], rel=1e-4)

    # Raw text is tokenized with the export's own tokenizer (written by lmtrain export): the same tokens again.
    model = load_eval_model(workdirs["lm"], mesh_shape=(1, 1, 1))
    from lmtrain.data import shards

    source = shards.split_source(text, "validation")
    raw = tmp_path / "docs.jsonl"
    raw.write_text("".join(json.dumps({"text": model.tokenizer.decode(np.frombuffer(source[i], "<u2")[:-1].tolist())})
                           + "\n" for i in range(3)))
    again = run_eval(capsys, hf, "--data", raw, "--mesh", "1,1,1", "--out", tmp_path / "raw")["result"]["metrics"]
    assert again["tokens"] == m["tokens"] and again["perplexity"] == pytest.approx(m["perplexity"], rel=1e-4)


# ----------------------------------------------------------------------------- generation


@pytest.mark.slow
def test_batched_generation_equals_one_prompt_at_a_time_and_scores_follow(workdirs, task_data, tmp_path, capsys):
    from lmtrain.model.decode import SamplingConfig, generate

    _, _, sft, _ = task_data
    # 6 examples in batches of 4: the second batch has filler rows, every batch the same padded width
    doc = run_eval(capsys, workdirs["sft"], "--data", sft, "--split", "test", "--max-examples", 6, "--batch-size", 4,
                   "--max-new-tokens", 12, "--mesh", "1,1,1", "--out", tmp_path)
    result = doc["result"]
    samples, m = result["samples"], result["metrics"]
    assert len(samples) == 6 and result["extra"]["generation"]["batch_size"] == 4
    model = load_eval_model(workdirs["sft"], mesh_shape=(1, 1, 1))
    tokenizer = model.tokenizer
    for s in samples:
        prompt = tokenizer(s["prompt"], add_special_tokens=True)["input_ids"]
        sampling = SamplingConfig(max_new_tokens=12, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.eos_token_id)
        new = generate(model.model_def, model.params, [prompt], sampling).tokens[0]
        new = new[:-1] if new and new[-1] == tokenizer.eos_token_id else new
        assert s["generation"] == tokenizer.decode(new, skip_special_tokens=True).strip()
    gens, refs = [s["generation"] for s in samples], [s["reference"] for s in samples]
    assert all(refs) and m["bleu"] == pytest.approx(bleu(gens, refs)) and m["chrf"] == pytest.approx(chrf(gens, refs))
    assert m["rouge_l"] == pytest.approx(rouge_l(gens, refs)) and m["exact_match"] == exact_match(gens, refs)
    assert m["examples"] == 6 and m["perplexity"] == pytest.approx(math.exp(m["loss"]))


@pytest.mark.slow
def test_the_trainer_logs_generative_metrics_that_eval_reproduces(workdirs, task_data, tmp_path, capsys):
    _, _, sft, _ = task_data
    logged = [json.loads(line) for line in open(os.path.join(workdirs["sft"], "metrics.jsonl"))]
    last = [r for r in logged if "val_bleu" in r][-1]
    assert last["step"] == 4 and {"val_chrf", "val_rouge_l", "val_exact_match"} <= set(last)
    m = run_eval(capsys, workdirs["sft"], "--data", sft, "--split", "validation", "--max-examples", 4,
                 "--metrics", "bleu,chrf,rouge_l,exact_match", "--out", tmp_path)["result"]["metrics"]
    for name in ("bleu", "chrf", "rouge_l", "exact_match"):
        assert m[name] == pytest.approx(last[f"val_{name}"], abs=1e-9), name


# ----------------------------------------------------------------------------- classification


@pytest.mark.slow
def test_classification_scores_by_hand_with_the_majority_baseline(workdirs, task_data, tmp_path, capsys):
    from lmtrain.data import shards

    _, _, _, classify = task_data
    assert cli.main(["--data", classify, "--out", str(tmp_path), workdirs["classify"]]) == 0
    capsys_out = capsys.readouterr().out
    result = json.loads((tmp_path / "eval.json").read_text())["result"]
    m = result["metrics"]
    model = load_eval_model(workdirs["classify"], mesh_shape=(1, 1, 1))
    manifest = shards.load_manifest(classify)
    source = shards.split_source(classify, "test")  # the default split when the shards have one
    logits_fn = jax.jit(model.model_def.apply)
    labels, preds, probs = [], [], []
    for i in range(len(source)):  # one example at a time, right-padded to one length (one compilation)
        tokens, _, label = shards.decode_record("classify", np.dtype("<u2"), source[i])
        inputs, segments = np.zeros((1, 48), np.int32), np.zeros((1, 48), np.int32)
        inputs[0, :len(tokens)], segments[0, :len(tokens)] = tokens, 1
        logits = logits_fn(model.params, inputs, np.arange(48, dtype=np.int32)[None], segments)
        labels.append(label)
        preds.append(int(np.argmax(np.asarray(logits)[0])))
        probs.append(np.asarray(jax.nn.softmax(np.asarray(logits, np.float32)[0])))
    counts = np.zeros((6, 6), int)
    np.add.at(counts, (labels, preds), 1)
    assert m["confusion_matrix"] == counts.tolist() and m["labels"] == manifest["labels"]
    assert m["accuracy"] == pytest.approx(np.trace(counts) / len(labels))
    majority = int(np.argmax(manifest["splits"]["train"]["label_counts"]))
    assert "majority_class_accuracy" not in m  # a reference point, not a score of the model
    assert result["extra"]["train_majority_baseline"] == {
        "label": manifest["labels"][majority], "accuracy": pytest.approx(labels.count(majority) / len(labels))}
    assert [s["prediction"] for s in result["samples"]] == [manifest["labels"][p] for p in preds]
    for s, p in zip(result["samples"], probs):
        assert list(s["probabilities"]) == [manifest["labels"][c] for c in np.argsort(-p, kind="stable")[:5]]
        assert list(s["probabilities"].values()) == pytest.approx(np.sort(p)[::-1][:5].tolist(), abs=2e-4)
    assert "train-majority baseline (not a model)" in capsys_out
    assert "confusion matrix" in open(tmp_path / "report.html").read().lower()


@pytest.mark.slow
def test_which_start_is_the_classifier_as_training_began(workdirs, task_data, tmp_path):
    """lr 1e-30 leaves float32 weights bit-identical after a step, so the checkpoint is the start."""
    from lmtrain.train.trainer import train

    tok, _, _, classify = task_data
    train(_cfg(tok, classify, **{"task.name": "classify", "train.init_from": workdirs["lm"], "train.steps": 1,
                                 "checkpoint.every": 1, "optimizer.lr": 1e-30, "optimizer.warmup_steps": 0,
                                 "train.seed": 7}), tmp_path / "c")
    start = load_eval_model(str(tmp_path / "c"), "start", (1, 1, 1))
    trained = load_eval_model(str(tmp_path / "c"), "latest", (1, 1, 1))
    assert start.checkpoint.startswith("start") and trained.checkpoint == "step 1 (latest)"
    for a, b in zip(jax.tree.leaves(start.params), jax.tree.leaves(trained.params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    lm = load_eval_model(workdirs["lm"], "latest", (1, 1, 1))
    np.testing.assert_array_equal(np.asarray(start.params["blocks"]["attn"]["wq"]),
                                  np.asarray(lm.params["blocks"]["attn"]["wq"]))


@pytest.mark.slow
def test_rows_are_as_long_as_the_data_needs_and_scores_do_not_change(workdirs, task_data, tmp_path, capsys,
                                                                      monkeypatch):
    """Examples of at most 33 tokens are scored in rows of the bucket they need (32 positions), not the model's 48,
    and every score equals scoring in rows of the whole window."""
    from lmtrain.evaluate import scoring

    _, _, sft, classify = task_data
    runs = {}
    for name, bucket in (("bucketed", scoring.bucket_length), ("whole_window", lambda needed, cap: cap)):
        monkeypatch.setattr(scoring, "bucket_length", bucket)
        runs[name] = (
            run_eval(capsys, workdirs["classify"], "--data", classify, "--out", tmp_path / name / "c")["result"],
            run_eval(capsys, workdirs["sft"], "--data", sft, "--max-examples", 5, "--max-new-tokens", 6,
                     "--mesh", "1,1,1", "--out", tmp_path / name / "s")["result"])
    (c, s), (c_full, s_full) = runs["bucketed"], runs["whole_window"]
    assert (c["extra"]["row_len"], s["extra"]["row_len"]) == (32, 33)
    assert (c_full["extra"]["row_len"], s_full["extra"]["row_len"]) == (48, 49)
    assert c["metrics"] == c_full["metrics"] and c["samples"] == c_full["samples"]
    assert s["metrics"]["tokens"] == s_full["metrics"]["tokens"]
    assert s["metrics"]["loss"] == pytest.approx(s_full["metrics"]["loss"], rel=1e-6)
    assert s["samples"] == s_full["samples"]


def test_bucket_length_is_a_power_of_two_within_the_model():
    from lmtrain.evaluate.scoring import bucket_length

    assert [bucket_length(n, 512) for n in (1, 16, 17, 33, 100, 300, 512, 600)] == [16, 16, 32, 64, 128, 512, 512,
                                                                                   512]
    assert bucket_length(20, 24) == 24 and bucket_length(5, 8) == 8


# ----------------------------------------------------------------------------- baseline, placement, storage


@pytest.mark.slow
def test_baseline_side_by_side_from_a_workdir_or_an_eval_json(workdirs, task_data, tmp_path, capsys):
    _, _, sft, _ = task_data
    args = ("--data", sft, "--max-examples", 4, "--max-new-tokens", 8)
    alone = run_eval(capsys, workdirs["lm"], *args, "--out", tmp_path / "base")
    both = run_eval(capsys, workdirs["sft"], *args, "--baseline", workdirs["lm"], "--out", tmp_path / "both")
    assert both["baseline"]["metrics"] == alone["result"]["metrics"]
    assert [s["prompt"] for s in both["baseline"]["samples"]] == [s["prompt"] for s in both["result"]["samples"]]
    html = open(tmp_path / "both" / "report.html").read()
    assert "generation (baseline)" in html and "generation (model)" in html
    again = run_eval(capsys, workdirs["sft"], *args, "--baseline", tmp_path / "base" / "eval.json",
                     "--out", tmp_path / "both")
    assert again["baseline"]["metrics"] == alone["result"]["metrics"]
    assert json.loads((tmp_path / "both" / "eval.1.json").read_text()) == both  # the earlier result is kept


@pytest.mark.slow
def test_sharded_evaluation_equals_one_device(workdirs, task_data, tmp_path, capsys):
    _, _, sft, _ = task_data
    args = (workdirs["sft"], "--data", sft, "--max-examples", 5, "--max-new-tokens", 8)
    one = run_eval(capsys, *args, "--mesh", "1,1,1", "--out", tmp_path / "one")["result"]
    sharded = run_eval(capsys, *args, "--mesh", "2,2,2", "--out", tmp_path / "sharded")["result"]
    assert [s["generation"] for s in sharded["samples"]] == [s["generation"] for s in one["samples"]]
    assert sharded["metrics"]["loss"] == pytest.approx(one["metrics"]["loss"], rel=1e-5)
    assert sharded["extra"]["generation"]["batch_size"] == 16  # a multiple of data x fsdp = 4


@pytest.mark.slow
def test_a_gcs_workdir_evaluates_like_a_local_one(fake_gcs, workdirs, task_data, tmp_path, capsys):
    from lmtrain.paths import copy_tree
    from lmtrain.train.trainer import train

    tok, _, sft, _ = task_data
    remote = f"{fake_gcs.url}/sft"
    train(_cfg(tok, sft, **{"task.name": "sft", "train.init_from": workdirs["lm"], "train.steps": 2,
                            "checkpoint.every": 2, "task.eval_generate_examples": 0}), remote)
    args = ("--data", sft, "--max-examples", 3, "--max-new-tokens", 6)
    there = run_eval(capsys, remote, *args)  # written next to the model: gs://.../sft/eval/test-step2
    assert as_path(f"{remote}/eval/test-step2/report.html").exists()
    copy_tree(remote, tmp_path / "local")
    here = run_eval(capsys, tmp_path / "local", *args, "--out", tmp_path / "out")
    assert there["result"]["metrics"] == here["result"]["metrics"]
    assert there["result"]["samples"] == here["result"]["samples"]


# ----------------------------------------------------------------------------- bad input


def test_bad_requests_are_one_line_errors(task_data, tmp_path, capsys):
    _, text, sft, classify = task_data
    nowhere = tmp_path / "no_model"
    assert "metric 'bleu' does not fit task 'classify'" in eval_error(capsys, nowhere, "--data", classify,
                                                                       "--metrics", "bleu")
    assert "Did you mean: perplexity" in eval_error(capsys, nowhere, "--data", sft, "--metrics", "perplexty")
    (tmp_path / "empty.txt").write_text("")
    assert "the eval set is empty" in eval_error(capsys, nowhere, "--data", tmp_path / "empty.txt")
    (tmp_path / "prompts.jsonl").write_text('{"prompt": "os.getcwd()\\n"}\n')
    err = eval_error(capsys, nowhere, "--data", tmp_path / "prompts.jsonl", "--format", "sft", "--metrics", "bleu")
    assert "the metrics bleu need references" in err and "'completion'" in err
    assert "no 'test' split" in eval_error(capsys, nowhere, "--data", text, "--split", "test")
    assert "--split test picks a split of a shard directory" in eval_error(
        capsys, nowhere, "--data", tmp_path / "prompts.jsonl", "--split", "test")
    assert "has no config.json" in eval_error(capsys, nowhere, "--data", text)
    assert "give three positive sizes" in eval_error(capsys, nowhere, "--data", text, "--mesh", "2,2")


@pytest.mark.slow
def test_bad_models_for_the_data_are_one_line_errors(workdirs, task_data, tmp_path, capsys):
    _, text, sft, classify = task_data
    err = eval_error(capsys, workdirs["lm"], "--data", classify)
    assert "has no classification head" in err and "--which start" in err
    assert "is a classifier" in eval_error(capsys, workdirs["classify"], "--data", sft)
    assert "no checkpoint for step 99" in eval_error(capsys, workdirs["lm"], "--data", text, "--which", "99")
    (tmp_path / "labels.jsonl").write_text('{"text": "Return the sum of two numbers.", "label": "poetry"}\n')
    err = eval_error(capsys, workdirs["classify"], "--data", tmp_path / "labels.jsonl", "--format", "classify")
    assert "label 'poetry' was never seen in training" in err and "labels.jsonl:1" in err


def test_lmtrain_commands_do_not_print_the_pytorch_not_found_warning():
    """Without PyTorch, transformers warns at import that models won't be available; lmtrain needs only its
    tokenizers and configs, so its commands leave that warning out (torch is hidden from the child process)."""
    import subprocess
    import sys

    hide_torch = "import sys; sys.modules['torch'] = None; "
    env = {k: v for k, v in os.environ.items() if k != "TRANSFORMERS_NO_ADVISORY_WARNINGS"}

    def stderr_of(code: str) -> str:
        done = subprocess.run([sys.executable, "-c", hide_torch + code], capture_output=True, text=True, env=env,
                              cwd=os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), timeout=120)
        assert done.returncode == 0, done.stderr
        return done.stderr

    assert "PyTorch was not found" in stderr_of("import transformers")  # what the test would catch
    # Every command goes through cli.main, which sets it before the command's module (and transformers) loads.
    assert "PyTorch was not found" not in stderr_of("from lmtrain.cli import main; main(['--version']); import transformers")


def test_a_shard_directory_that_does_not_exist_is_named_as_such(tmp_path):
    from lmtrain.data.shards import ShardError, load_manifest

    with pytest.raises(ShardError, match=r"shard directory .*nope does not exist; check the path"):
        load_manifest(tmp_path / "nope")
    with pytest.raises(ShardError, match="has no manifest.json"):  # a directory without one is another matter
        load_manifest(tmp_path)


def test_sft_examples_of_a_tokenizer_without_eos_end_with_its_separator(tmp_path):
    """A BERT tokenizer has no EOS: shard_data ends completions with [SEP], and eval reads them the same way, from
    shards and from raw records (it used to refuse: 'has no EOS token; evaluation needs one')."""
    FAMILIES["bert"]().save_pretrained(str(tmp_path / "bert"))
    tok = load_tokenizer(tmp_path / "bert")
    records = [{"prompt": "the cat sat on", "completion": " a mat"}, {"prompt": "her dog ran", "completion": " to see"}]
    data = tmp_path / "sft.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in records))
    assert shard_data.main(["--format", "sft", "--input", str(data), "--tokenizer", str(tmp_path / "bert"),
                            "--output", str(tmp_path / "shards"), "--seq-len", "32", "--val-fraction", "0",
                            "--test-fraction", "1", "--quiet"]) == 0

    from_shards = examples_lib.encode(examples_lib.read_eval_set(str(tmp_path / "shards")), tok, None, len(tok), 33)
    raw = examples_lib.encode(examples_lib.read_eval_set(str(data), raw_format="sft"), tok, None, len(tok), 33)
    for enc in (from_shards, raw):
        assert enc.references == ["a mat", "to see"]  # the [SEP] that ends each completion is not in the reference
        assert [tokens[-1] for tokens, _ in enc.pieces] == [tok.sep_token_id] * 2
        assert [list(mask[-3:]) for _, mask in enc.pieces] == [[1, 1, 1]] * 2  # completion + [SEP] are targets
    assert [t.tolist() for t, _ in from_shards.pieces] == [t.tolist() for t, _ in raw.pieces]


def test_a_task_with_no_scorer_of_its_own_is_scored_by_its_eval_step(task_data, tmp_path, capsys, monkeypatch):
    """A WORKDIR whose task declares no lmtrain eval scorer (here a registered task that also has aux state and
    prepare) is scored by its own eval step, prepared as in training: on training's validation batch, the eval
    metrics equal the trainer's last evaluation."""
    from lmtrain import tasks as tasks_lib
    from lmtrain.train.trainer import train
    from tests.tasks.test_tasks import _ReferenceWeightedLM

    monkeypatch.setattr(tasks_lib, "_registered", {})
    tasks_lib.register_task("ref_weighted_lm", _ReferenceWeightedLM)
    monkeypatch.setattr(_ReferenceWeightedLM, "eval_kind", None)
    tok, text, _, _ = task_data
    workdir = tmp_path / "run"
    result = train(_cfg(tok, text, **{"task.name": "ref_weighted_lm", "train.steps": 2, "train.eval_every": 2,
                                      "train.eval_batches": 1, "checkpoint.every": 2}), workdir)
    doc = run_eval(capsys, workdir, "--data", text, "--split", "validation", "--batch-size", 8, "--max-examples", 8,
                   "--out", tmp_path / "eval")
    scored = doc["result"]
    assert scored["task"] == "ref_weighted_lm" and scored["checkpoint"].startswith("step 2")
    assert set(scored["metrics"]) == {"loss", "perplexity"} and scored["extra"]["batches"] == 1
    assert math.isclose(scored["metrics"]["loss"], result.metrics["val_loss"], rel_tol=1e-5)
    assert (tmp_path / "eval" / "report.html").exists()
    err = eval_error(capsys, workdir, "--data", text, "--metrics", "bleu")
    assert "bleu not among task ref_weighted_lm's metrics (loss, perplexity)" in err
