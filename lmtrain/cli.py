"""The `lmtrain` command: a thin dispatcher to one module per subcommand."""

from __future__ import annotations

import importlib
import os
import sys

import lmtrain
from lmtrain.errors import ConfigError
from lmtrain.plugins import load_plugins
from lmtrain.runtime import apply_xla_defaults
from lmtrain.train.disk_full import quiet_disk_full_noise

# subcommand -> (module with a `main(argv) -> int`, one-line help)
COMMANDS = {
    "train": ("lmtrain.train.trainer", "train or resume a model in a WORKDIR"),
    "import": ("lmtrain.interop.hf_import", "import a Hugging Face checkpoint into a WORKDIR"),
    "export": ("lmtrain.interop.hf_export", "export a WORKDIR checkpoint to a Hugging Face directory"),
    "generate": ("lmtrain.generate", "generate text from a WORKDIR with a KV cache"),
    "serve": ("lmtrain.serve.cli", "serve a model over an OpenAI-compatible HTTP API, with API keys"),
    "bench-serve": ("lmtrain.serve.bench", "measure a running server: latency percentiles and tokens/s"),
    "launch": ("lmtrain.launch", "run training on a Cloud TPU slice, relaunched after preemptions until done"),
    "sweep": ("lmtrain.sweep", "search hyperparameters with optuna, one WORKDIR per trial"),
    "eval": ("lmtrain.evaluate.cli", "evaluate a model: task metrics, eval.json and an HTML report"),
}


# Commands that read or write sharded checkpoints: under a multi-process launcher every process joins the
# job (`train` does it inside, after installing its signal handlers).
JOINS_A_JOB = ("import", "export", "generate", "eval", "serve")
# The join itself, loaded like the commands above, by name when it runs: it imports JAX, and this module must not
# (importing JAX takes a second or more, and a SIGTERM in that second would kill `lmtrain train` with exit 143
# before _hold_stop_signals runs; tests/train/test_checkpoint.py sends one).
JOIN_A_JOB = ("lmtrain.parallel.mesh", "maybe_initialize_distributed")


def _usage() -> str:
    lines = ["usage: lmtrain COMMAND [options]   (lmtrain COMMAND --help for its options; lmtrain --version)", "",
             "commands:"]
    lines += [f"  {name:<12} {help_}" for name, (_, help_) in COMMANDS.items()]
    return "\n".join(lines)


def _hold_stop_signals() -> None:
    """Keep a SIGTERM/SIGINT that arrives while JAX is still loading (seconds): the trainer's handler
    takes it over (lmtrain.train.actions.StopSignal) and stops before step 1 with exit 0, instead of
    the process dying with 143 and no message."""
    import signal

    def hold(signum, _frame):
        hold.received.append(signum)

    hold.received = []
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, hold)


def main(argv: list[str] | None = None) -> int:
    # transformers announces at import that PyTorch is missing (an advisory warning): lmtrain uses it for tokenizers
    # and configs only, which need no PyTorch, so every command would print a warning about nothing. Set before any
    # command imports transformers (in main, not at import: importing this module changes no process state); a
    # user's own setting wins.
    os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    if argv[0] in ("-V", "--version"):
        print(f"lmtrain {lmtrain.__version__}")
        return 0
    name, rest = argv[0], argv[1:]
    # Before any JAX backend starts. JAX is imported by now (lmtrain.parallel.mesh), which is fine: XLA reads
    # XLA_FLAGS when its first backend starts, not at import.
    apply_xla_defaults()
    if name == "train":
        _hold_stop_signals()
    if name in ("train", "sweep"):  # the commands that save checkpoints
        quiet_disk_full_noise()
    if name not in COMMANDS:
        print(f"lmtrain: unknown command '{name}'.\n\n{_usage()}", file=sys.stderr)
        return 2
    try:
        module = importlib.import_module(COMMANDS[name][0])
    except ModuleNotFoundError as e:
        if e.name and e.name.startswith("lmtrain"):
            print(f"lmtrain: command '{name}' is not available in this build ({e.name} missing).", file=sys.stderr)
            return 2
        raise
    try:  # before the command reads a config: a plugin task, format or family must be registered first
        load_plugins()
    except ConfigError as e:
        print(f"lmtrain {name}: error: {e}", file=sys.stderr)
        return 2
    if name in JOINS_A_JOB:
        try:  # one process per host: they form one JAX job before touching a checkpoint
            getattr(importlib.import_module(JOIN_A_JOB[0]), JOIN_A_JOB[1])()
        except ConfigError as e:
            print(f"lmtrain {name}: error: {e}", file=sys.stderr)
            return 2
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
