"""Every bash block of the README, as a user pastes it.

Each section's blocks are either **run** (in order, in one fresh directory with `tools/` beside it, as in the
repository root, on input files made here under the names the README uses) or, where they cannot run on this
machine (a cloud account, a GPU, a placeholder such as `WORKDIR` or `...`), **checked**: every `lmtrain` and
`python tools/*.py` command of the block is parsed by the command's own argument parser, and every other program
must be one this file names. A section this file does not list fails the test, so a new block is classified
when it is written.

What a run changes, and only this: each `--config=NAME` with a short variant runs NAME:runlocal (or :smoke); a
train command on an imported config.json runs a few steps; placeholders of the "Hugging Face models" section are
filled with paths made here; `pip install` is not run (the suite runs inside that install). Everything else
(paths, flags, the order) is the README's, so a command that the README gets wrong fails here."""

import csv
import importlib
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
SHORT_ARGS = ("runlocal", "smoke")  # the configs' test variants, in order of preference
IMPORTED_RUN_SHORT = ["--config.train.steps=6", "--config.optimizer.warmup_steps=2", "--config.train.eval_every=6",
                      "--config.train.eval_batches=2", "--config.task.eval_generate_examples=4",
                      "--config.checkpoint.every=6", "--config.train.sample_tokens=0"]

RUN, CHECK, SYNOPSIS = "run", "check", "synopsis"
# Every section with a bash block: RUN; CHECK with the reason it cannot run here; or SYNOPSIS, a usage line whose
# options must all be the command's own (its --help names each).
SECTIONS = {
    "Install": (CHECK, "pip installs; the suite runs inside that install"),
    "Quickstart": (RUN, ""),
    "Tests": (CHECK, "the test commands (this suite), and under Cloud TPU pods the launcher's own"),
    "Training": (SYNOPSIS, ""),
    "Your own data": (RUN, ""),
    "Preparing data for a task (fine-tuning)": (RUN, ""),
    "Preparing data on a cluster": (CHECK, "a Dataflow project or a Flink cluster; tests/prep runs --runner beam"),
    "Fine-tune for a task": (RUN, ""),
    "Preference and reinforcement fine-tuning: DPO, ORPO, reward models, GRPO": (
        CHECK, "tests/tasks/test_dpo.py, test_reward.py and test_grpo.py train them"),
    "The parameter-rules table": (CHECK, "`--config ...` placeholder"),
    "LoRA": (CHECK, "`--config ...` and BASE_WORKDIR placeholders"),
    "Export and import of a LoRA run": (CHECK, "RUN/OUT/BASE placeholders; tests/interop/test_lora_interop.py runs them"),
    "Evaluate": (SYNOPSIS, ""),
    "Before and after fine-tuning": (CHECK, "the walkthrough's eval commands, run there"),
    "Tune hyperparameters": (SYNOPSIS, ""),
    "Retrain as new data arrives": (CHECK, "needs a finished run in runs/v1 and a new month of data"),
    "Pretrain with masked language modelling, then fine-tune": (RUN, ""),
    "Encoder-decoder models: T5": (CHECK, "tests/tasks/test_seq2seq.py and tests/e2e/test_configs.py train t5_tiny"),
    "Hugging Face models": (RUN, ""),
    "Deploy": (CHECK, "starts a server that runs until stopped; tests/serve/test_serve.py runs it"),
    "1. One-time set-up on your workstation": (CHECK, "a Google Cloud account"),
    "2. Data and tokenizer, into the bucket": (CHECK, "a Google Cloud bucket"),
    "3. The TPU: `setup_tpu.sh`": (CHECK, "a Google Cloud project; tests/test_setup_tpu.py runs it on a fake gcloud"),
    "4. Train: `lmtrain launch run`": (CHECK, "a TPU slice; tests/test_launch.py runs it on a fake gcloud"),
    "5. Watch it, stop it, resume it": (CHECK, "a TPU slice; tests/test_launch.py runs it on a fake gcloud"),
    "GPU clusters with SLURM": (CHECK, "a SLURM cluster; tests/test_launch.py runs it with a fake sbatch"),
    "Benchmarks": (CHECK, "benchmarks print timings; not tests"),
}
# Programs a CHECK block may call that are not lmtrain's (and so are not parsed here).
EXTERNAL = {"pip", "gcloud", "sbatch", "tensorboard", "N=$(gcloud", "bash", "curl", "vllm"}
# CHECK sections whose blocks call only other programs (pip, gcloud, setup_tpu.sh, sbatch).
NO_LMTRAIN_COMMAND = ("Install", "Tests", "1. One-time set-up on your workstation", "3. The TPU: `setup_tpu.sh`",
                      "GPU clusters with SLURM")
# Placeholders of the "Hugging Face models" section, and what a run puts in their place.
HF_PLACEHOLDERS = {"HF_DIR": "hf_model", "WORKDIR": "hf_run", "OUT": "hf_out"}


def sections() -> dict[str, list[tuple[str, str]]]:
    """Section title (## or ###) -> its (language, code) blocks, in order."""
    text = (REPO / "README.md").read_text()
    heads = [(m.start(), m.group(1)) for m in re.finditer(r"^#{2,3} (.*)$", text, re.M)]
    out: dict[str, list[tuple[str, str]]] = {}
    for m in re.finditer(r"```(\w+)\n(.*?)```", text, re.S):
        title = [t for pos, t in heads if pos < m.start()][-1]
        out.setdefault(title, []).append((m.group(1), m.group(2)))
    return out


def bash_commands(code: str) -> list[str]:
    """One string per command: continuation lines joined, `&&` chains split, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#.*$", "", line).strip()
        if line and not line.startswith("#"):
            commands += [part.strip() for part in line.split(" && ")]
    return commands


def short_config(name: str) -> str:
    """NAME:runlocal (or :smoke) for a config file that has one, else NAME as it is."""
    if name.endswith(".json") or ":" in name:
        return name
    args = getattr(importlib.import_module(f"configs.{name}"), "ARGS", ())
    short = next((a for a in SHORT_ARGS if a in args), None)
    return f"{name}:{short}" if short else name


def shorten(command: str) -> list[str]:
    words = shlex.split(command)
    out = ["--config=" + short_config(w.split("=", 1)[1]) if w.startswith("--config=") else w for w in words]
    if words[:2] == ["lmtrain", "train"] and any(w.startswith("--config=") and w.endswith(".json") for w in words):
        out += IMPORTED_RUN_SHORT  # later flags win: the README's steps become a few
    return out


def _env() -> dict:
    return dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                XLA_FLAGS="", MPLBACKEND="Agg")


STDERR = "\n--- stderr ---\n"  # between a command's stdout and stderr in run_commands' result


def run_commands(commands: list[list[str]], cwd: Path) -> list[str]:
    """Run each argv in `cwd` as a user's shell would; returns what each printed (stdout, then stderr)."""
    outputs = []
    for argv in commands:
        if argv[0] == "python":
            argv = [sys.executable] + argv[1:]
        done = subprocess.run(argv, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=900)
        assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
        outputs.append(done.stdout + STDERR + done.stderr)
    return outputs


def runnable(code: str) -> list[list[str]]:
    return [shorten(c) for c in bash_commands(code) if not c.startswith("pip install")]


def new_dir(tmp_path: Path) -> Path:
    (tmp_path / "tools").symlink_to(REPO / "tools")
    return tmp_path


# ---------------------------------------------------------------- input files under the README's names

def write_text_data(root: Path, n_docs: int = 120) -> None:
    """data/*.jsonl: documents of the built-in corpus (the "Your own data" input)."""
    from lmtrain.data.builtin_corpus import builtin_documents

    docs = builtin_documents(max_docs=n_docs)
    (root / "data").mkdir(exist_ok=True)
    for part in range(2):
        with open(root / "data" / f"part{part}.jsonl", "w") as f:
            for doc in docs[part::2]:
                f.write(json.dumps({"text": doc}) + "\n")


def write_task_data(root: Path) -> None:
    """train.jsonl (sft), chats.jsonl (chat) and reviews.csv (classify), small and made up."""
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    with open(root / "train.jsonl", "w") as f, open(root / "chats.jsonl", "w") as g:
        for i in range(60):
            a, b = words[i % 12], words[(i * 5) % 12]
            f.write(json.dumps({"prompt": f"Combine {a} and {b} #{i}:", "completion": f" {a}-{b}"}) + "\n")
            g.write(json.dumps({"messages": [{"role": "user", "content": f"Say {a} {b}, case {i}."},
                                             {"role": "assistant", "content": f"{a} {b}"}]}) + "\n")
    with open(root / "reviews.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["text", "label"])
        for i in range(90):
            label = ("good", "bad", "mixed")[i % 3]
            w.writerow([f"Review {i}: the {words[i % 12]} was {label} and {words[(i * 7) % 12]}.", label])


def make_hf_model(out: Path, tokenizer_dir: Path) -> None:
    """A small random Llama with `tokenizer_dir`'s tokenizer and a ChatML template: a user's model directory."""
    from transformers import LlamaConfig, LlamaForCausalLM

    tok_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1100)
    LlamaForCausalLM(cfg).save_pretrained(out)
    shutil.copy(tokenizer_dir / "tokenizer.json", out / "tokenizer.json")
    tok_cfg["chat_template"] = (REPO / "tests" / "fixtures" / "chat_templates" / "chatml.jinja").read_text()
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    assert tok_cfg.get("eos_token")


def small_tokenizer(out: Path) -> Path:
    from lmtrain.data.builtin_corpus import builtin_documents
    from lmtrain.data.tokenizer import train_bpe_tokenizer

    train_bpe_tokenizer(builtin_documents(max_docs=80), 1024, out)
    return out


# ---------------------------------------------------------------- the tests

def test_every_section_with_a_bash_block_is_run_or_checked():
    found = {title for title, blocks in sections().items() if any(lang == "bash" for lang, _ in blocks)}
    assert found - set(SECTIONS) == set(), "classify these README sections in tests/e2e/test_readme.py SECTIONS"
    assert set(SECTIONS) - found == set(), "SECTIONS lists sections the README no longer has"


PARSE_ONLY = r"""
import argparse, json, os, runpy, sys
import jax, transformers  # noqa: F401 - imported once, before the forks
import lmtrain.cli, lmtrain.evaluate.cli, lmtrain.generate, lmtrain.interop.hf_export  # noqa: F401
import lmtrain.interop.hf_import, lmtrain.launch, lmtrain.sweep, lmtrain.train.trainer  # noqa: F401
depth = [0]
parse = argparse.ArgumentParser.parse_known_args
def parse_then_stop(self, args=None, namespace=None):
    depth[0] += 1
    try:
        result = parse(self, args, namespace)
    finally:
        depth[0] -= 1
    if depth[0] == 0:  # the command's own parser accepted the arguments: stop before it does anything
        unknown = [a for a in result[1] if not a.startswith("--config.")]  # parse_args refuses these after us
        if unknown:
            self.error("unrecognized arguments: " + " ".join(unknown))
        os._exit(0)
    return result
argparse.ArgumentParser.parse_known_args = parse_then_stop
def run(argv):
    if argv[0] == "lmtrain":
        sys.argv = argv
        sys.exit(lmtrain.cli.main(argv[1:]))
    sys.argv = argv[1:]
    runpy.run_path(argv[1], run_name="__main__")
    sys.exit(3)  # the command ran to its end without parsing anything
codes = []
for argv in json.loads(sys.argv[1]):
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        try:
            run(argv)
        except SystemExit as e:
            os._exit(e.code if isinstance(e.code, int) else 1)
        except BaseException:
            os._exit(4)
    codes.append(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
print("CODES " + json.dumps(codes), flush=True)
"""


def parse_only(commands: list[list[str]]) -> tuple[list[int], str]:
    """Each argv parsed by its command's own parser (in one process, a fork each): exit codes, and stderr."""
    done = subprocess.run([sys.executable, "-c", PARSE_ONLY, json.dumps(commands)], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=600)
    codes = re.search(r"^CODES (.*)$", done.stdout, re.M)
    assert codes, done.stdout[-2000:] + done.stderr[-3000:]
    return json.loads(codes.group(1)), done.stderr


def lmtrain_commands(title: str) -> list[list[str]]:
    """The section's lmtrain and tools/*.py commands as argv; fails on a program this file does not know."""
    commands = []
    for lang, code in sections().get(title, []):
        if lang != "bash":
            continue
        for command in bash_commands(code):
            words = shlex.split(command)
            if words[0] == "python" and words[1:2] == ["-m"]:
                continue  # python -m pytest: the test runner
            if words[0] == "lmtrain":
                commands.append(words)
            elif words[0] == "python" and words[1].startswith("tools/"):
                commands.append(["python", str(REPO / words[1]), *words[2:]])
            else:
                assert words[0] in EXTERNAL, f"'{words[0]}' in '{title}' is neither lmtrain's nor a known program"
    return commands


@pytest.fixture(scope="module")
def parsed_checked_sections() -> tuple[dict[str, list[tuple[list[str], int]]], str]:
    titles = [t for t, (mode, _) in SECTIONS.items() if mode == CHECK]
    per_title = {t: lmtrain_commands(t) for t in titles}
    flat = [c for t in titles for c in per_title[t]]
    codes, stderr = parse_only(flat)
    it = iter(zip(flat, codes))
    return {t: [next(it) for _ in per_title[t]] for t in titles}, stderr


@pytest.mark.parametrize("title", [t for t, (mode, _) in SECTIONS.items() if mode == CHECK])
def test_a_block_that_cannot_run_here_parses_with_the_commands_own_parser(title, parsed_checked_sections):
    by_title, stderr = parsed_checked_sections
    results = by_title[title]
    bad = [shlex.join(argv) for argv, code in results if code != 0]
    assert not bad, f"refused by their own parser: {bad}\n{stderr[-3000:]}"
    if title not in NO_LMTRAIN_COMMAND:
        assert results, f"'{title}' has no lmtrain command to check"


@pytest.mark.parametrize("title", [t for t, (mode, _) in SECTIONS.items() if mode == SYNOPSIS])
def test_a_synopsis_names_only_options_the_command_has(title):
    (code,) = [c for lang, c in sections()[title] if lang == "bash"]
    (line,) = bash_commands(code)
    words = line.split()
    assert words[0] == "lmtrain", line
    done = subprocess.run([sys.executable, "-m", "lmtrain.cli", words[1], "--help"], cwd=REPO, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    options = set(re.findall(r"(--[a-z][a-z-]*)(?![.a-z-])", line)) - {"--config"}
    assert options, line
    missing = {o for o in options if not re.search(rf"{o}\b", done.stdout)}
    assert not missing, f"'{title}' names options that `lmtrain {words[1]} --help` does not: {sorted(missing)}"


def test_a_typo_in_a_checked_command_is_caught():
    """The parse check can fail: an option the command does not have, or a missing required one, is refused."""
    codes, stderr = parse_only([["lmtrain", "export", "RUN", "OUT", "--wich", "best"],
                                ["lmtrain", "train", "--config=tiny"], ["lmtrain", "export", "RUN", "OUT"]])
    assert codes == [2, 2, 0] and "--wich" in stderr and "--workdir" in stderr


@pytest.mark.slow
@pytest.mark.heavy
def test_quickstart_runs_and_runs_again(tmp_path):
    """The quickstart chain (pip aside), then the same chain again, as after a Ctrl-C: each tool keeps what it
    finished and says so, and `lmtrain train` finds the run complete."""
    (code,) = [c for lang, c in sections()["Quickstart"] if lang == "bash"]
    commands = runnable(code)
    assert [c[:2] for c in commands] == [["python", "tools/train_tokenizer.py"], ["python", "tools/shard_data.py"],
                                          ["lmtrain", "train"]]
    root = new_dir(tmp_path)
    run_commands(commands, root)
    first = {p.name: p.stat().st_mtime_ns for p in (root / "workdir" / "shards").iterdir()}
    again = run_commands(commands, root)
    assert "kept" in again[0].lower(), again[0][-2000:]
    assert "kept" in again[1].lower() or "nothing to do" in again[1].lower(), again[1][-2000:]
    assert "complete" in again[2].lower(), again[2][-2000:]
    assert {p.name: p.stat().st_mtime_ns for p in (root / "workdir" / "shards").iterdir()} == first


@pytest.mark.slow
@pytest.mark.heavy
def test_your_own_data(tmp_path):
    root = new_dir(tmp_path)
    write_text_data(root)
    (code,) = [c for lang, c in sections()["Your own data"] if lang == "bash"]
    out = run_commands(runnable(code), root)
    printed = re.search(r"vocab size: (\d+)", out[0])
    assert printed and int(printed.group(1)) <= 10245, out[0][-1500:]  # the README trains with 10245
    assert (root / "runs" / "own" / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.heavy
def test_preparing_data_for_a_task(tmp_path):
    root = new_dir(tmp_path)
    write_task_data(root)
    make_hf_model(root / "hf_model", small_tokenizer(tmp_path / "tok"))
    (code,) = [c for lang, c in sections()["Preparing data for a task (fine-tuning)"] if lang == "bash"]
    run_commands(runnable(code), root)
    for out, fmt in (("sft_shards", "sft"), ("chat_shards", "chat"), ("cls_shards", "classify")):
        manifest = json.loads((root / out / "manifest.json").read_text())
        assert manifest["example_format"] == fmt, (out, sorted(manifest))


@pytest.mark.slow
@pytest.mark.heavy
def test_hugging_face_models(tmp_path):
    """The section's five commands with HF_DIR, WORKDIR and OUT filled in: import, shard, train, export, generate."""
    root = new_dir(tmp_path)
    write_text_data(root, n_docs=60)
    make_hf_model(root / "hf_model", small_tokenizer(tmp_path / "tok"))
    (code,) = [c for lang, c in sections()["Hugging Face models"] if lang == "bash"]
    commands = []
    for command in bash_commands(code):
        for placeholder, path in HF_PLACEHOLDERS.items():
            command = re.sub(rf"\b{placeholder}\b", path, command)
        commands.append(shorten(command))
    out = run_commands(commands, root)
    assert (root / "hf_out" / "config.json").exists()
    assert out[-1].strip(), "generate printed nothing"


@pytest.mark.slow
@pytest.mark.heavy
def test_encoders_pretrain_then_fine_tune(tmp_path):
    root = new_dir(tmp_path)
    blocks = [c for lang, c in sections()["Pretrain with masked language modelling, then fine-tune"] if lang == "bash"]
    assert len(blocks) == 2
    example = re.search(r"# data/ner.jsonl: (\{.*\})", blocks[1]).group(1)
    record = json.loads(example)
    (root / "data").mkdir()
    with open(root / "data" / "ner.jsonl", "w") as f:  # the README's example line, in several sentences
        for i in range(40):
            f.write(json.dumps({"tokens": record["tokens"] + [f"w{i}"], "tags": record["tags"] + ["O"]}) + "\n")
    run_commands(runnable(blocks[0]) + runnable(blocks[1]), root)
    assert (root / "workdir" / "bert_tiny_classify_hf" / "config.json").exists()
    assert (root / "workdir" / "ner" / "metrics.jsonl").exists()


@pytest.mark.slow
@pytest.mark.heavy
def test_finetune_walkthrough(tmp_path):
    """"Fine-tune for a task": every block in order; the `path/to/hf_model` it imports is a small Llama built
    here with the walkthrough's own tokenizer."""
    blocks = sections()["Fine-tune for a task"]
    assert [lang for lang, _ in blocks].count("python") == 1 and len(blocks) >= 6, blocks
    root = new_dir(tmp_path)
    ran = []
    for lang, code in blocks:
        if lang == "python":
            commands = [[sys.executable, "-c", code]]
        else:
            commands = []
            for command in bash_commands(code):
                if "path/to/hf_model" in command:
                    make_hf_model(root / "hf_model", root / "workdir" / "tokenizer")
                    command = command.replace("path/to/hf_model", "hf_model")
                commands.append(shorten(command))
        ran += zip(commands, run_commands(commands, root))

    w = root / "workdir"
    # what each step promised to leave behind
    for path in ("tiny_sft/eval/test-*/report.html", "tiny_classify/eval/test-*/report.html",
                 "tiny_classify/confusion_matrix.png", "tiny_sft_hf/config.json", "tiny_classify_hf/config.json",
                 "base/init_params", "base_sft/metrics.jsonl"):
        assert list(w.glob(path)), f"{path} missing; have {sorted(p.name for p in w.iterdir())}"
    sft_eval = json.loads(next(w.glob("tiny_sft/eval/test-*/eval.json")).read_text())
    assert {"bleu", "chrf", "rouge_l", "exact_match"} <= set(sft_eval["result"]["metrics"])
    assert sft_eval["baseline"], "the README promises the base model side by side"
    # the walkthrough ships the checkpoint it evaluated
    exported = [out for argv, out in ran if argv[:2] == ["lmtrain", "export"]]
    for name, step_dir in ((n, next(w.glob(f"{n}/eval/test-*")).name) for n in ("tiny_sft", "tiny_classify")):
        step = step_dir.removeprefix("test-step")
        assert any(name in out and f"step {step}" in out for out in exported), (name, step_dir, exported)
    labels = json.loads((w / "tiny_classify" / "labels.json").read_text())
    stdout = ran[-1][1].split(STDERR)[0]  # transformers' loading bars go to stderr
    assert stdout.strip().splitlines()[-1] in labels, stdout  # transformers' classifier answered with one of the classes
