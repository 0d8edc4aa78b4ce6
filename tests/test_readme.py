"""The README's "Fine-tune for a task" walkthrough, run command by command as a user pastes it: every bash
block and the Python block of that section, in order, in one fresh directory (with `tools/` beside it, as in
the repository root). Two things change, both said here: each `--config=NAME` with a short variant runs
NAME:runlocal (or :smoke), and a train command on an imported config.json runs a few steps; the
`path/to/hf_model` the section imports is a small Llama built here by transformers with the walkthrough's own
tokenizer. Everything else (paths, flags, the order) is the README's, so a command that the README gets wrong
fails here."""

import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHORT_ARGS = ("runlocal", "smoke")  # the configs' test variants, in order of preference
IMPORTED_RUN_SHORT = ["--config.train.steps=6", "--config.optimizer.warmup_steps=2", "--config.train.eval_every=6",
                      "--config.train.eval_batches=2", "--config.task.eval_generate_examples=4",
                      "--config.checkpoint.every=6", "--config.train.sample_tokens=0"]

pytestmark = [pytest.mark.slow, pytest.mark.heavy]


def readme_section(title: str) -> str:
    text = (REPO / "README.md").read_text()
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start:end if end > 0 else None]


def code_blocks(section: str) -> list[tuple[str, str]]:
    """(language, code) of each fenced block, in order."""
    return [(m.group(1), m.group(2)) for m in re.finditer(r"```(\w+)\n(.*?)```", section, re.S)]


def bash_commands(code: str) -> list[str]:
    """One string per command: continuation lines joined, comments and blank lines dropped."""
    joined = re.sub(r"\\\n\s*", " ", code)
    return [line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith("#")]


def short_config(name: str) -> str:
    """NAME:runlocal (or :smoke) for a config file that has one, else NAME as it is."""
    if name.endswith(".json") or ":" in name:
        return name
    import importlib

    args = getattr(importlib.import_module(f"configs.{name}"), "ARGS", ())
    short = next((a for a in SHORT_ARGS if a in args), None)
    return f"{name}:{short}" if short else name


def shorten(command: str) -> str:
    words = shlex.split(command)
    out = []
    for w in words:
        if w.startswith("--config="):
            w = "--config=" + short_config(w.split("=", 1)[1])
        out.append(w)
    if words[:2] == ["lmtrain", "train"] and any(w.startswith("--config=") and w.endswith(".json") for w in words):
        out += IMPORTED_RUN_SHORT  # later flags win: the README's steps become a few
    return shlex.join(out)


def make_hf_model(out: Path, tokenizer_dir: Path) -> None:
    """A small random Llama with the walkthrough's tokenizer: what a user's downloaded model directory holds."""
    import json

    from transformers import LlamaConfig, LlamaForCausalLM

    tok_cfg = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    vocab = len(json.loads((tokenizer_dir / "tokenizer.json").read_text())["model"]["vocab"])
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    LlamaForCausalLM(cfg).save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tokenizer_dir / name, out / name)
    assert tok_cfg.get("eos_token")


def test_finetune_walkthrough(tmp_path):
    blocks = code_blocks(readme_section("Fine-tune for a task"))
    assert [lang for lang, _ in blocks].count("python") == 1 and len(blocks) >= 6, blocks
    (tmp_path / "tools").symlink_to(REPO / "tools")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
               XLA_FLAGS="", MPLBACKEND="Agg")
    ran = []
    for lang, code in blocks:
        if lang == "python":
            commands = [[sys.executable, "-c", code]]
        else:
            commands = []
            for command in bash_commands(code):
                if "path/to/hf_model" in command:
                    make_hf_model(tmp_path / "hf_model", tmp_path / "workdir" / "tokenizer")
                    command = command.replace("path/to/hf_model", "hf_model")
                commands.append(shlex.split(shorten(command)))
        for argv in commands:
            if argv[0] == "python":
                argv = [sys.executable] + argv[1:]
            done = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
            assert done.returncode == 0, f"{shlex.join(argv)}\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
            ran.append((argv, done.stdout))

    w = tmp_path / "workdir"
    # what each step promised to leave behind
    for path in ("tiny_sft/eval/test-*/report.html", "tiny_classify/eval/test-*/report.html",
                 "tiny_classify/confusion_matrix.png", "tiny_sft_hf/config.json", "tiny_classify_hf/config.json",
                 "base/init_params", "base_sft/metrics.jsonl"):
        assert list(w.glob(path)), f"{path} missing; have {sorted(p.name for p in w.iterdir())}"
    import json

    sft_eval = json.loads(next(w.glob("tiny_sft/eval/test-*/eval.json")).read_text())
    assert {"bleu", "chrf", "rouge_l", "exact_match"} <= set(sft_eval["result"]["metrics"])
    assert sft_eval["baseline"], "the README promises the base model side by side"
    labels = json.loads((w / "tiny_classify" / "labels.json").read_text())
    assert ran[-1][1].strip().splitlines()[-1] in labels  # transformers' classifier answered with one of the classes
