"""Start-up and save errors of `lmtrain train` (issue 7, "Errors instead of tracebacks"): exit code 2 and
one line that names the key or the file and says what to do; nothing of the user's is lost."""

from __future__ import annotations

import contextlib
import json
import re
import signal
import subprocess

import pytest

from lmtrain.config import to_json
from lmtrain.train import checkpoint as ckpt_lib
from lmtrain.train.trainer import main, train
from tests import core_fixtures
from tests.core_fixtures import cli, run_config


def _main_error(args: list[str], capsys) -> str:
    """Run trainer.main; assert exit code 2 and a one-line error without a traceback; return that line."""
    code = main(args)
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("override, names", [
    ("data.batch_size=0", "data.batch_size=0"),
    ("train.log_every=0", "train.log_every=0"),
    ("model.n_kv_heads=0", "model.n_kv_heads=0"),
    ("optimizer.lr=-0.001", "optimizer.lr=-0.001"),
    ("optimizer.lr=0", "optimizer.lr=0"),
    ("data.seq_len=0", "data.seq_len=0"),
    ("data.batch_size=-8", "data.batch_size=-8"),
    ("optimizer.lr=inf", "optimizer.lr=inf is not a finite number"),
    ("optimizer.eps=nan", "optimizer.eps=nan is not a finite number"),
    ("train.z_loss=-inf", "train.z_loss=-inf is not a finite number"),
    ("optimizer.b2=1.0", "optimizer.b2=1.0 must lie in [0, 1)"),
    ("optimizer.param_rules=(('wq','lr=inf'),)", "label 'lr=inf' needs a finite non-negative number"),
    ("model.lora_rank=100", "model.lora_rank=100 is above the smaller dimension of the 'v' projection (128 -> 64); "
                            "use a rank of at most 64"),
])
def test_out_of_range_values_are_refused_before_anything_is_written(tmp_path, capsys, override, names):
    workdir = tmp_path / "w"
    err = _main_error(["--config=tiny", f"--workdir={workdir}", f"--config.{override}"], capsys)
    assert names in err, err
    assert not workdir.exists()


def test_unknown_config_argument_is_refused(tmp_path, capsys):
    err = _main_error(["--config=tiny:foo", f"--workdir={tmp_path / 'w'}"], capsys)
    assert "tiny:foo" in err and "smoke" in err, err
    err = _main_error(["--config=gpt2_small:runlcoal", f"--workdir={tmp_path / 'w'}"], capsys)
    assert "runlocal" in err, err
    assert not (tmp_path / "w").exists()


def test_train_without_arguments_asks_for_config_and_workdir(capsys):
    with pytest.raises(SystemExit) as info:
        main([])
    err = capsys.readouterr().err
    assert info.value.code == 2
    assert "--config" in err.splitlines()[-1] and "--workdir" in err.splitlines()[-1], err
    assert "Traceback" not in err


def test_workdir_that_is_a_file(tmp_path, capsys):
    path = tmp_path / "notes.txt"
    path.write_text("mine")
    err = _main_error(["--config=tiny", f"--workdir={path}"], capsys)
    assert str(path) in err and "is a file" in err, err
    assert path.read_text() == "mine"


class _Timeout(Exception):
    pass


@contextlib.contextmanager
def _deadline(seconds: int):
    """Fail instead of hanging (the issue saw 6 minutes)."""

    def fire(*_):
        raise _Timeout(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, fire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)


def test_checkpoints_that_is_a_file_fails_fast(tmp_path, capsys):
    workdir = tmp_path / "w"
    workdir.mkdir()
    (workdir / "checkpoints").write_text("not a directory")
    with _deadline(60):
        err = _main_error(["--config=tiny", f"--workdir={workdir}"], capsys)
    assert str(workdir / "checkpoints") in err and "is a file" in err, err
    assert (workdir / "checkpoints").read_text() == "not a directory"


def test_read_only_workdir(tmp_path, capsys):
    """chmod does not stop root, so the WORKDIR is a read-only tmpfs (EROFS stops everyone)."""
    with core_fixtures.tmpfs(tmp_path / "ro", "ro,size=1m") as ro:
        err = _main_error(["--config=tiny", f"--workdir={ro}"], capsys)
        assert f"--workdir={ro} is not writable" in err and "Choose a WORKDIR" in err, err
        err = _main_error(["--config=tiny", f"--workdir={ro / 'run'}"], capsys)
        assert f"--workdir={ro / 'run'} cannot be created" in err, err


@pytest.mark.slow
@pytest.mark.usefixtures("compile_cache")
def test_disk_full_during_a_save_keeps_the_older_checkpoints_and_says_so(tmp_path, tokenizer_512, capsys,
                                                                         compile_cache_dir):
    """A real full disk: a tmpfs shrunk, after step 2 is saved, to what is used plus 256 KiB."""
    with core_fixtures.tmpfs(tmp_path / "disk", "size=64m") as disk:
        workdir = disk / "run"
        config = tmp_path / "config.json"
        config.write_text(to_json(run_config(tokenizer_512, 6, **{"checkpoint.keep": 5})))
        assert main([f"--config={config}", f"--workdir={workdir}", "--stop-at-step=2"]) == 0
        capsys.readouterr()
        step2 = core_fixtures.tree_digest(workdir / "checkpoints" / "2")
        used_kib = int(subprocess.run(["du", "-sk", str(disk)], capture_output=True, text=True).stdout.split()[0])
        subprocess.run(["mount", "-o", f"remount,size={used_kib + 256}k", str(disk)], check=True)

        # In a subprocess: the failed asynchronous writes leave Orbax futures whose exceptions are logged, with
        # tracebacks, from another thread when they are collected; in the test process that raced CPython 3.11's
        # ast.parse (traceback carets use it) and broke every later ast.parse of the session.
        proc = cli(["train", f"--config={config}", f"--workdir={workdir}", "--no-progress"], compile_cache_dir)
        out, _ = proc.communicate(timeout=300)
        assert proc.returncode == 2, out[-3000:]
        assert re.search(r"lmtrain: checkpoint error: the disk is full: saving checkpoint 4 .*The earlier checkpoints "
                         r"\[2\] are kept and intact\. Free space", out), out[-3000:]
        # No copy of the ENOSPC error from Orbax's threads, asyncio or absl. Left: TensorStore's C++ I/O threads may
        # print "Event loop is closed" (their callbacks racing the closed save loop, outside any Python hook).
        assert "RESOURCE_EXHAUSTED" not in out and "ValueError" not in out, out[-3000:]
        # Several such threads print at once and their writes interleave mid-line, so the check removes every piece
        # of those tracebacks and requires that only lmtrain's own lines remain: any other traceback or error
        # (another file, another exception, its message) is left over and fails it.
        late = (r"Traceback \(most recent call last\):|File \"[^\"]*asyncio/base_events\.py\", line \d+, in \w+|"
                r"self\._check_closed\(\)|raise RuntimeError\('Event loop is closed'\)|RuntimeError|Event loop is closed")
        rest = [line.strip() for line in re.sub(late, "", out).splitlines() if line.strip(" \t:")]  # ": " is written apart
        assert all(line.startswith(("lmtrain", "step ")) for line in rest), rest
        assert core_fixtures.tree_digest(workdir / "checkpoints" / "2") == step2
        assert ckpt_lib.verify_checksums(workdir / "checkpoints" / "2") is None

        # With space again, the same command resumes from step 2 and finishes.
        subprocess.run(["mount", "-o", "remount,size=64m", str(disk)], check=True)
        result = train(run_config(tokenizer_512, 6, **{"checkpoint.keep": 5}), workdir)
        assert result.step == 6
        steps = [json.loads(line)["step"] for line in (workdir / "metrics.jsonl").read_text().splitlines()
                 if "loss" in json.loads(line)]
        assert steps == [1, 2, 3, 4, 5, 6], steps


@pytest.mark.slow
@pytest.mark.parametrize("args, needle", [
    (["train", "--config=tiny", "--config.optimizer.lr=-1e-3"], "optimizer.lr=-0.001 must be positive"),
    (["train", "--config=tiny:foo"], "unknown argument 'foo'"),
    (["train"], "the following arguments are required: --config, --workdir"),
])
def test_errors_through_the_cli(tmp_path, args, needle):
    if len(args) > 1:
        args = [*args, f"--workdir={tmp_path / 'w'}"]
    proc = cli(args)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 2, out
    assert needle in out and "Traceback" not in out, out
    assert not (tmp_path / "w").exists()
