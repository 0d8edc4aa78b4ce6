"""One `lmtrain train` per WORKDIR (lmtrain.locking): a second run is refused in one line naming the first, a
lock left by a killed run is taken over, and the same holds on gs:// through the object-generation precondition."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from lmtrain.config import to_json
from lmtrain.locking import LOCK_NAME, DirectoryInUse, DirLock
from lmtrain.train import trainer
from tests.core_fixtures import REPO, cli, run_config

pytestmark = pytest.mark.usefixtures("compile_cache")

HOLD = """
import sys, time
from lmtrain.locking import DirLock
with DirLock(sys.argv[1], "lmtrain train"):
    print("held", flush=True)
    time.sleep(600)
"""


def _logged_steps(workdir) -> list[int]:
    path = workdir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines()
            if line.endswith("}") and "loss" in json.loads(line)]


def _wait_for(predicate, proc, seconds=300):
    deadline = time.time() + seconds
    while time.time() < deadline and proc.poll() is None and not predicate():
        time.sleep(0.1)
    assert proc.poll() is None, proc.communicate()[0]


@pytest.mark.slow
@pytest.mark.heavy  # ~45 s: two training processes; test_a_train_in_a_held_workdir_exits_2 is the light check
def test_a_second_train_in_the_same_workdir_is_refused_and_the_first_goes_on(tmp_path, tokenizer_512,
                                                                               compile_cache_dir):
    workdir, config = tmp_path / "run", tmp_path / "config.json"
    config.write_text(to_json(run_config(tokenizer_512, 100000, **{"train.eval_every": 0, "checkpoint.every": 5})))
    args = ["train", f"--config={config}", f"--workdir={workdir}", "--no-progress"]
    first = cli(args, compile_cache_dir)
    _wait_for(lambda: len(_logged_steps(workdir)) >= 2, first)

    second = cli(args, compile_cache_dir)
    out, _ = second.communicate(timeout=300)
    assert second.returncode == 2, out
    error = out.strip().splitlines()[-1]
    assert "Traceback" not in out and error.startswith("lmtrain: error: "), out
    assert f"in use by another lmtrain train (pid {first.pid} on host {socket.gethostname()}, since " in error

    seen = len(_logged_steps(workdir))
    _wait_for(lambda: len(_logged_steps(workdir)) >= seen + 2, first)  # the first run trains on
    first.send_signal(signal.SIGTERM)
    out, _ = first.communicate(timeout=120)
    assert first.returncode == 0 and "Traceback" not in out, out
    steps = _logged_steps(workdir)
    assert steps == list(range(1, len(steps) + 1)), "every step logged once"
    assert (workdir / LOCK_NAME).read_text() == "", "the first run released its lock"


def test_a_train_in_a_held_workdir_exits_2_naming_the_holder(tmp_path, tokenizer_512, capsys):
    config = tmp_path / "config.json"
    config.write_text(to_json(run_config(tokenizer_512, 4)))
    (tmp_path / "run").mkdir()
    with DirLock(tmp_path / "run", "lmtrain train"):
        code = trainer.main([f"--config={config}", f"--workdir={tmp_path / 'run'}", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"in use by another lmtrain train (pid {os.getpid()} on host {socket.gethostname()}" in err
    assert not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "config.json").exists()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(tmp_path)], cwd=REPO, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(DirectoryInUse, match=f"pid {holder.pid} on host {socket.gethostname()}"):
        DirLock(tmp_path, "lmtrain train", log=print).acquire()
    holder.send_signal(signal.SIGKILL)
    holder.wait(timeout=30)
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == str(holder.pid)  # it could not clean up
    notes = []
    with DirLock(tmp_path, "lmtrain train", log=notes.append):
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == str(os.getpid())
    assert len(notes) == 1 and f"taking over {tmp_path / LOCK_NAME} from pid {holder.pid}" in notes[0], notes
    with DirLock(tmp_path, "lmtrain train", log=notes.append):  # a clean release leaves nothing to take over
        pass
    assert len(notes) == 1, notes


def test_the_lock_on_gs_uses_a_generation_precondition_and_a_lease(fake_gcs):
    url = f"{fake_gcs.url}/run"
    first = DirLock(url, "lmtrain train", lease=60).acquire()
    assert f"run/{LOCK_NAME}" in fake_gcs.object_names()
    with pytest.raises(DirectoryInUse, match="in use by another lmtrain train \\(pid \\d+ on host "):
        DirLock(url, "lmtrain train").acquire()
    first.release()
    assert f"run/{LOCK_NAME}" not in fake_gcs.object_names()

    notes = []
    lost = DirLock(url, "lmtrain train", lease=60).acquire()
    lost._stop.set()  # a run whose machine was lost: nobody renews its lease
    lost._renewer.join()
    with pytest.raises(DirectoryInUse):  # leased for another minute
        DirLock(url, "lmtrain train", log=notes.append).acquire()
    fs, bucket, name = lost._fs_key()  # ... and now that minute has passed
    fields = fs.info(f"{bucket}/{name}")["metadata"]
    fs.call("PATCH", "b/{}/o/{}", bucket, name, json={"metadata": {**fields, "expires": str(time.time() - 1)}})
    fs.invalidate_cache()
    taker = DirLock(url, "lmtrain train", log=notes.append, lease=0.4).acquire()
    assert len(notes) == 1 and "whose lease expired" in notes[0] and f"pid {fields['pid']}" in notes[0], notes
    time.sleep(1.0)  # well past its own 0.4 s lease: only its renewals keep it
    with pytest.raises(DirectoryInUse):
        DirLock(url, "lmtrain train").acquire()
    lost._generation = None  # taken over: the lost run has nothing left to release
    taker.release()
    assert f"run/{LOCK_NAME}" not in fake_gcs.object_names()
