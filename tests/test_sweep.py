"""`lmtrain sweep` with a fake train function: samplers, pruning, results, kill and resume, cross-validation and
the errors for a bad space or a sweep directory that holds another sweep. One slow test runs the real trainer."""

import csv
import json
import math
import os
import pathlib
import re
import signal
import sqlite3
import subprocess
import sys
import textwrap
import types

import pytest

from lmtrain import config as config_lib
from lmtrain import sweep

STEPS, EVAL_EVERY = 100, 20
OVERRIDES = {"train.steps": STEPS, "train.eval_every": EVAL_EVERY, "optimizer.warmup_steps": 10}


def fake_final(cfg) -> float:
    """The 'validation loss' a config ends at: best at lr = 1e-3 and no warmup; fold k adds 0.1 k."""
    fold = cfg.data.cv_fold
    return 1.0 + (math.log10(cfg.optimizer.lr) + 3.0) ** 2 + 0.001 * cfg.optimizer.warmup_steps + 0.1 * fold


def fake_train(cfg, workdir, show_progress=None, stop_at_step=None, on_eval=None):
    """Evaluates every eval_every steps on a curve that falls to `fake_final(cfg)`, 'checkpoints' after each
    evaluation (as the trainer does), resumes from the checkpoint, and logs each call's start step.
    FAKE_KILL_AT=TRIAL:STEP SIGKILLs the process after that trial reported STEP and before it checkpointed."""
    os.makedirs(workdir, exist_ok=True)
    state_path = os.path.join(workdir, "fake_checkpoint.json")
    start = json.load(open(state_path))["step"] if os.path.exists(state_path) else 0
    with open(os.path.join(workdir, "fake_calls.jsonl"), "a") as f:
        f.write(json.dumps({"start": start}) + "\n")
    steps, every, final = cfg.train.steps, cfg.train.eval_every, fake_final(cfg)
    if final > 50:
        raise FloatingPointError("loss is nan at step 3: training diverged.")
    kill = os.environ.get("FAKE_KILL_AT", "")
    metrics = {}
    for step in range(start + every, steps + 1, every):
        metrics = {"val_loss": final + 3.0 * (1 - step / steps), "val_perplexity": 0.0}
        stop = on_eval is not None and on_eval(step, metrics)
        if kill == f"{os.path.basename(workdir)}:{step}":  # reported, but killed before the checkpoint
            os.kill(os.getpid(), signal.SIGKILL)
        with open(state_path, "w") as f:
            json.dump({"step": step}, f)
        if stop:
            return types.SimpleNamespace(step=step, stopped_by="on_eval", metrics=metrics, best_metric=None,
                                         interrupted=False)
    return types.SimpleNamespace(step=steps, stopped_by=None, metrics=metrics, best_metric=None, interrupted=False)


def make_spec(params=None, **fields):
    raw = {"base_config": "tiny", "overrides": dict(OVERRIDES), "n_trials": 6, "sampler": "random", "pruner": "none",
           "params": params or {"optimizer.lr": {"type": "float", "low": 1e-4, "high": 1e-2, "log": True},
                                "optimizer.warmup_steps": {"type": "int", "low": 0, "high": 40, "step": 10}}}
    raw.update(fields)
    return sweep.parse_spec(raw, "space.yaml")


def calls(workdir) -> list[int]:
    with open(os.path.join(workdir, "fake_calls.jsonl")) as f:
        return [json.loads(line)["start"] for line in f]


def quiet(_msg):
    pass


def test_yaml_space_parses_and_converts_yaml_text_numbers(tmp_path):
    path = tmp_path / "space.yaml"
    path.write_text(textwrap.dedent("""
        base_config: tiny
        overrides: {train.steps: 100}
        metric: val_loss
        sampler: {name: tpe, n_startup_trials: 3}
        params:
          optimizer.lr: {type: float, low: 1e-4, high: 1e-2, log: true}   # PyYAML reads 1e-4 as text
          data.batch_size: [8, 16]
          optimizer.b2: [0.95, 9.9e-1]
          optimizer.warmup_steps: {type: int, low: 0, high: 100, step: 20}
    """))
    spec = sweep.parse_spec(sweep.load_space(path), str(path))
    assert spec.direction == "minimize" and spec.sampler == {"name": "tpe", "n_startup_trials": 3}
    lr, batch, b2, warmup = spec.params
    assert (lr.kind, lr.low, lr.high, lr.log) == ("float", 1e-4, 1e-2, True)
    spec = sweep.validate_space(spec, sweep.resolve_base_config(spec))
    assert spec.params[2].choices == (0.95, 0.99)  # '9.9e-1' text became the float the config key holds
    assert warmup.grid_values("s") == [0, 20, 40, 60, 80, 100]


def test_python_space_file(tmp_path):
    path = tmp_path / "space.py"
    path.write_text("SWEEP = {'metric': 'val_accuracy', 'params': {'optimizer.lr': [1e-3, 3e-3]}}\n")
    spec = sweep.parse_spec(sweep.load_space(path), str(path))
    assert spec.direction == "maximize" and spec.params[0].choices == (1e-3, 3e-3)


@pytest.mark.parametrize("raw,message", [
    ({"params": {"optimizer.lr": {"type": "float", "low": 1e-2, "high": 1e-4}}}, "low .* must be below high"),
    ({"params": {"optimizer.lr": {"type": "float", "low": 0, "high": 1, "log": True}}}, "log-scale range needs low > 0"),
    ({"params": {"optimizer.lr": {"type": "float", "low": 0.1, "hi": 1}}}, "unknown field 'hi'"),
    ({"params": {"optimizer.lr": {"type": "float", "low": 0.1, "high": 1}}, "samplr": "tpe"},
     "unknown field 'samplr'. Did you mean: sampler"),
    ({"params": {"optimizer.lr": {"type": "float", "low": 0.1, "high": 1}}, "sampler": "grid"},
     "params.optimizer.lr: a grid search needs a finite set"),
    ({"params": {"optimizer.lr": [1e-3]}, "metric": "throughput"}, "add 'direction: minimize'"),
    ({"params": {}}, "'params' must map config keys"),
    ({"params": {"data.cv_fold": [0, 1]}}, "set by the sweep itself"),
])
def test_bad_space_is_a_clear_error(raw, message):
    with pytest.raises(sweep.SweepError, match=message):
        sweep.parse_spec(raw, "space.yaml")


@pytest.mark.parametrize("content, message", [
    ("params:\n  optimizer.lr: {type: float, low: 1.0e-4, high: .inf}\n",
     "params.optimizer.lr.high: expected a finite number, got inf"),
    ("params:\n  optimizer.lr: {type: float, low: .nan, high: 1.0}\n",
     "params.optimizer.lr.low: expected a finite number, got nan"),
    ("params:\n  optimizer.warmup_steps: {type: int, low: 0, high: 40, step: -2}\n",
     "params.optimizer.warmup_steps.step: must be positive \\(got -2\\)"),
    ("params:\n  optimizer.warmup_steps: {type: int, low: 0, high: 40, step: 0}\n",
     "params.optimizer.warmup_steps.step: must be positive \\(got 0\\)"),
    ("params:\n  optimizer.lr: {type: float, low: 0.1, high: 0.5, step: 0}\n",
     "params.optimizer.lr.step: must be positive \\(got 0\\)"),
    (b"params:\n  optimizer.lr: [0.001]  # \xe9t\xe9\n", "not UTF-8 text"),
])
def test_a_bad_space_file_is_one_line_naming_the_file_and_key(tmp_path, capsys, content, message):
    space = tmp_path / "space.yaml"
    space.write_bytes(content if isinstance(content, bytes) else content.encode())
    assert sweep.main([f"--space={space}", f"--sweep-dir={tmp_path / 's'}"], train_fn=fake_train) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert re.search(f"{re.escape(str(space))}: {message}", err), err


def test_a_python_space_file_that_is_not_utf8_is_one_line(tmp_path, capsys):
    space = tmp_path / "space.py"
    space.write_bytes(b"SWEEP = {'params': {'optimizer.lr': [1e-3]}, 'metric': '\xe9t\xe9'}\n")
    assert sweep.main([f"--space={space}", f"--sweep-dir={tmp_path / 's'}"], train_fn=fake_train) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and f"{space}: line 1: " in err and "utf-8" in err, err


def test_unknown_config_key_names_it_and_suggests_close_ones():
    spec = make_spec({"optimizer.lrr": [1e-3]})
    with pytest.raises(sweep.SweepError, match=r"space.yaml: params.optimizer.lrr: unknown config key 'optimizer.lrr' "
                                               r"\(not in the base config\). Did you mean: optimizer.lr"):
        sweep.validate_space(spec, sweep.resolve_base_config(spec))
    spec = make_spec({"lr": [1e-3]})
    with pytest.raises(sweep.SweepError, match="unknown config key 'lr'.*Did you mean: .*optimizer.lr"):
        sweep.validate_space(spec, sweep.resolve_base_config(spec))
    spec = make_spec({"optimizer.warmup_steps": {"type": "float", "low": 0.5, "high": 10}})
    with pytest.raises(sweep.SweepError, match="the config key is an integer; use 'type: int'"):
        sweep.validate_space(spec, sweep.resolve_base_config(spec))
    spec = make_spec(overrides={"train.stepz": 5})
    with pytest.raises(sweep.SweepError, match="overrides.train.stepz: unknown config key 'train.stepz'.*train.steps"):
        sweep.resolve_base_config(spec)


def test_random_sweep_writes_table_plots_and_a_trainable_best_config(tmp_path):
    sweep_dir = tmp_path / "sweep"
    lines = []
    study = sweep.run_sweep(make_spec(), sweep_dir, train_fn=fake_train, log=lines.append)
    values = [t.value for t in study.trials]
    assert len(values) == 6 and all(v is not None for v in values)
    best = min(study.trials, key=lambda t: t.value)
    # each trial trained in its own WORKDIR, once, from step 0
    workdirs = [t.user_attrs["workdir"] for t in study.trials]
    assert len(set(workdirs)) == 6 and all(calls(w) == [0] for w in workdirs)
    # the value is the metric at the last evaluation, as the fake computes it
    assert best.value == pytest.approx(fake_final(sweep.trial_config(sweep.resolve_base_config(make_spec()), best.params)))
    with open(sweep_dir / "trials.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["trial"]) for r in rows] == list(range(6))
    assert float(rows[best.number]["val_loss"]) == pytest.approx(best.value)
    assert {"optimizer.lr", "optimizer.warmup_steps", "seconds", "workdir"} <= set(rows[0])
    for png in ("metric_per_trial.png", "param_importance.png"):
        assert (sweep_dir / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cfg = config_lib.load_config(str(sweep_dir / "best_config.json"))  # what `lmtrain train --config=` does
    assert cfg.optimizer.lr == pytest.approx(best.params["optimizer.lr"])
    assert cfg.optimizer.warmup_steps == best.params["optimizer.warmup_steps"] and cfg.train.steps == STEPS
    summary = json.loads((sweep_dir / "best.json").read_text())
    assert summary["best_trial"] == best.number and summary["workdir"] == best.user_attrs["workdir"]
    # lr moves the fake's loss by up to 4, warmup by at most 0.04
    assert summary["importance"]["optimizer.lr"] > summary["importance"]["optimizer.warmup_steps"]
    printed = "\n".join(lines)
    assert f"*{best.number} " in printed and "best_config.json" in printed


def test_grid_visits_every_point_once(tmp_path):
    spec = make_spec({"optimizer.lr": [1e-4, 1e-3, 1e-2], "optimizer.warmup_steps": {"type": "int", "low": 0,
                                                                                      "high": 20, "step": 20}},
                     sampler="grid", n_trials=None)
    study = sweep.run_sweep(spec, tmp_path / "s", train_fn=fake_train, log=quiet)
    seen = sorted((t.params["optimizer.lr"], t.params["optimizer.warmup_steps"]) for t in study.trials)
    assert seen == sorted((lr, w) for lr in (1e-4, 1e-3, 1e-2) for w in (0, 20))
    assert study.best_trial.params == {"optimizer.lr": 1e-3, "optimizer.warmup_steps": 0}


def test_tpe_concentrates_near_the_optimum(tmp_path):
    spec = make_spec({"optimizer.lr": {"type": "float", "low": 1e-5, "high": 1e-1, "log": True}}, sampler="tpe",
                     n_trials=20, seed=1)
    spec.sampler["n_startup_trials"] = 5
    study = sweep.run_sweep(spec, tmp_path / "s", train_fn=fake_train, log=quiet)
    late = [abs(math.log10(t.params["optimizer.lr"]) + 3) for t in study.trials[10:]]
    early = [abs(math.log10(t.params["optimizer.lr"]) + 3) for t in study.trials[:5]]
    assert sorted(late)[len(late) // 2] < sorted(early)[len(early) // 2]  # median distance to 1e-3 shrinks
    assert abs(math.log10(study.best_params["optimizer.lr"]) + 3) < 0.3


def test_median_pruner_stops_bad_trials_early(tmp_path):
    # Trials 0-2 are good (lr near 1e-3); later bad trials sit above the median curve from the first report.
    params = {"optimizer.lr": [1e-3, 1.2e-3, 8e-4, 1e-2, 1e-4, 2e-2]}
    spec = make_spec(params, sampler="grid", pruner={"name": "median", "n_startup_trials": 3}, n_trials=None)
    study = sweep.run_sweep(spec, tmp_path / "s", train_fn=fake_train, log=quiet)
    by_lr = {t.params["optimizer.lr"]: t for t in study.trials}
    for lr in (1e-2, 1e-4, 2e-2):
        t = by_lr[lr]
        assert t.state.name == "PRUNED"
        assert max(t.intermediate_values) < STEPS  # stopped by on_eval returning True, not at the end
        ckpt = json.load(open(os.path.join(t.user_attrs["workdir"], "fake_checkpoint.json")))
        assert ckpt["step"] == max(t.intermediate_values)
    assert all(by_lr[lr].state.name == "COMPLETE" for lr in (1e-3, 1.2e-3, 8e-4))
    with open(tmp_path / "s" / "trials.csv") as f:
        assert sum(r["state"] == "pruned" for r in csv.DictReader(f)) == 3


def test_hyperband_pruner_uses_steps_as_resource(tmp_path):
    spec = make_spec(pruner="hyperband", n_trials=4)
    pruner = sweep._make_pruner(spec, sweep.resolve_base_config(spec), None)
    assert (pruner._min_resource, pruner._max_resource) == (EVAL_EVERY, STEPS)
    study = sweep.run_sweep(spec, tmp_path / "s", train_fn=fake_train, log=quiet)
    assert len(study.trials) == 4


def test_failed_trials_are_recorded_and_the_sweep_goes_on(tmp_path):
    # lr = 1e5 makes the fake diverge (FloatingPointError, as the trainer raises on a NaN loss).
    spec = make_spec({"optimizer.lr": [1e-3, 1e5, 2e-3]}, sampler="grid", n_trials=None)
    study = sweep.run_sweep(spec, tmp_path / "s", train_fn=fake_train, log=quiet)
    states = {t.params["optimizer.lr"]: (t.state.name, t.user_attrs.get("error", "")) for t in study.trials}
    assert states[1e5][0] == "FAIL" and "diverged" in states[1e5][1]
    assert states[1e-3][0] == states[2e-3][0] == "COMPLETE"


def test_early_stopping_finishes_a_trial_and_a_signal_interrupts_the_sweep(tmp_path):
    def early_stopped(cfg, workdir, show_progress=None, stop_at_step=None, on_eval=None):
        on_eval(20, {"val_loss": 2.0})
        return types.SimpleNamespace(step=20, stopped_by="early stopping: val_loss has not improved", best_metric=2.0,
                                     metrics={"val_loss": 2.0}, interrupted=False)

    study = sweep.run_sweep(make_spec(n_trials=2), tmp_path / "a", train_fn=early_stopped, log=quiet)
    assert [(t.state.name, t.value) for t in study.trials] == [("COMPLETE", 2.0)] * 2

    def preempted(cfg, workdir, show_progress=None, stop_at_step=None, on_eval=None):
        on_eval(20, {"val_loss": 2.0})
        return types.SimpleNamespace(step=20, stopped_by="SIGTERM", best_metric=None, metrics={"val_loss": 2.0},
                                     interrupted=True)

    lines = []
    study = sweep.run_sweep(make_spec(n_trials=3), tmp_path / "b", train_fn=preempted, log=lines.append)
    assert len(study.trials) == 1 and study.trials[0].user_attrs["interrupted"] == "SIGTERM"
    assert any("stopped by SIGTERM; run the same command to resume it" in line for line in lines)
    study = sweep.run_sweep(make_spec(n_trials=3), tmp_path / "b", train_fn=fake_train, log=quiet)
    assert study.trials[1].user_attrs["retry_of"] == 0 and study.trials[1].params == study.trials[0].params
    assert sum(t.state.name == "COMPLETE" for t in study.trials) == 3


@pytest.mark.parametrize("escape", ["absolute", "dotdot"])
def test_a_trial_workdir_from_sweep_db_outside_the_sweep_is_refused(tmp_path, escape):
    def preempted(cfg, workdir, show_progress=None, stop_at_step=None, on_eval=None):
        on_eval(20, {"val_loss": 2.0})
        return types.SimpleNamespace(step=20, stopped_by="SIGTERM", best_metric=None, metrics={"val_loss": 2.0},
                                     interrupted=True)

    sweep.run_sweep(make_spec(n_trials=2), tmp_path / "s", train_fn=preempted, log=quiet)
    outside = tmp_path / "precious"
    outside.mkdir()
    (outside / "keep.txt").write_text("mine")
    crafted = str(outside) if escape == "absolute" else str(tmp_path / "s" / "trials" / ".." / ".." / "precious")
    with sqlite3.connect(tmp_path / "s" / "sweep.db") as db:  # a crafted (or copied) sweep.db
        assert db.execute("UPDATE trial_user_attributes SET value_json = ? WHERE key = 'workdir'",
                          (json.dumps(crafted),)).rowcount == 1
    with pytest.raises(sweep.SweepError, match=f"trial \\d+'s workdir '{re.escape(crafted)}' is not inside "):
        sweep.run_sweep(make_spec(n_trials=2), tmp_path / "s", train_fn=fake_train, log=quiet)
    assert [p.name for p in outside.iterdir()] == ["keep.txt"]


def test_the_same_failure_three_times_in_a_row_stops_the_sweep(tmp_path):
    def broken(cfg, workdir, show_progress=None, stop_at_step=None, on_eval=None):
        raise config_lib.ConfigError("data.shards_dir='': no manifest.json there; run tools/shard_data.py first.")

    with pytest.raises(sweep.SweepError, match="3 trials in a row failed with the same error.*no manifest.json"):
        sweep.run_sweep(make_spec(n_trials=10), tmp_path / "s", train_fn=broken, log=quiet)
    rows = list(csv.DictReader(open(tmp_path / "s" / "trials.csv")))
    assert [r["state"] for r in rows] == ["fail"] * 3 and "no manifest.json" in rows[0]["error"]


def test_a_sweep_whose_every_trial_fails_exits_non_zero(tmp_path, capsys):
    def refused(cfg, workdir, show_progress=None, stop_at_step=None, on_eval=None):  # a different message each time
        raise config_lib.ConfigError(f"optimizer.lr={cfg.optimizer.lr} is refused by this test.")

    space = tmp_path / "space.yaml"
    space.write_text(textwrap.dedent("""
        base_config: tiny
        n_trials: 4
        sampler: random
        pruner: none
        params:
          optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    """))
    assert sweep.main([f"--space={space}", f"--sweep-dir={tmp_path / 's'}"], train_fn=refused) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert "all 4 trials failed, so no 'val_loss' was measured; the last one: config error: optimizer.lr=" in err
    assert [r["state"] for r in csv.DictReader(open(tmp_path / "s" / "trials.csv"))] == ["fail"] * 4


def test_a_metric_the_trainer_does_not_report_is_an_error(tmp_path):
    spec = make_spec(metric="val_accuracy")
    with pytest.raises(sweep.SweepError, match="metric 'val_accuracy' is not among .*val_loss, val_perplexity"):
        sweep.run_sweep(spec, tmp_path / "s", train_fn=fake_train, log=quiet)


def _child_sweep(sweep_dir: str, n_trials: int) -> None:
    """Runs in a subprocess that FAKE_KILL_AT kills."""
    sweep.run_sweep(make_spec(n_trials=n_trials), sweep_dir, train_fn=fake_train, log=quiet)


def test_killed_sweep_resumes_the_running_trial_from_its_checkpoint(tmp_path):
    sweep_dir = str(tmp_path / "s")
    code = (f"import sys; sys.path.insert(0, {os.path.dirname(__file__)!r}); import test_sweep; "
            f"test_sweep._child_sweep({sweep_dir!r}, 5)")
    env = {**os.environ, "FAKE_KILL_AT": "trial_0002:60"}
    child = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert child.returncode == -signal.SIGKILL, child.stderr[-2000:]

    lines = []
    study = sweep.run_sweep(make_spec(n_trials=5), sweep_dir, train_fn=fake_train, log=lines.append)
    killed = study.trials[2]
    assert killed.state.name == "FAIL" and killed.user_attrs["interrupted"] == "killed"
    retry = next(t for t in study.trials if t.user_attrs.get("retry_of") == 2)
    assert retry.state.name == "COMPLETE" and retry.params == killed.params
    assert retry.user_attrs["workdir"] == killed.user_attrs["workdir"]
    assert calls(killed.user_attrs["workdir"]) == [0, 40]  # resumed from its checkpoint, not from scratch
    # the pruner sees the whole curve: the killed attempt's reports (20..60) and the resumed run's (60..100)
    assert sorted(retry.intermediate_values) == list(range(EVAL_EVERY, STEPS + 1, EVAL_EVERY))
    assert retry.intermediate_values[60] == pytest.approx(killed.intermediate_values[60])
    # 5 trials count toward the budget: the killed one is replaced by its retry
    assert len(study.trials) == 6 and sum(t.state.name == "COMPLETE" for t in study.trials) == 5
    assert any("trial 2 was interrupted; queued again" in line for line in lines)
    with open(os.path.join(sweep_dir, "trials.csv")) as f:
        assert next(csv.DictReader(f), None) is not None
    assert "interrupted (retried as #" in open(os.path.join(sweep_dir, "trials.csv")).read()
    # no duplicate draws after the resume: the sampler was re-seeded by the trials already there
    lrs = [t.params["optimizer.lr"] for t in study.trials if "retry_of" not in t.user_attrs]
    assert len(set(lrs)) == len(lrs)


def test_resume_extends_a_finished_sweep(tmp_path):
    sweep.run_sweep(make_spec(n_trials=2), tmp_path / "s", train_fn=fake_train, log=quiet)
    study = sweep.run_sweep(make_spec(n_trials=4), tmp_path / "s", train_fn=fake_train, log=quiet)
    assert len(study.trials) == 4
    assert [calls(t.user_attrs["workdir"]) for t in study.trials] == [[0]] * 4  # finished trials were not rerun


def test_a_directory_holding_another_sweep_is_refused(tmp_path):
    sweep.run_sweep(make_spec(n_trials=1), tmp_path / "s", train_fn=fake_train, log=quiet)
    other_space = make_spec({"optimizer.lr": {"type": "float", "low": 1e-5, "high": 1e-2, "log": True}}, n_trials=1)
    with pytest.raises(sweep.SweepError, match=r"holds another sweep .*params.optimizer.lr.low: 0.0001 -> 1e-05"):
        sweep.run_sweep(other_space, tmp_path / "s", train_fn=fake_train, log=quiet)
    other_base = make_spec(n_trials=1, overrides={**OVERRIDES, "train.steps": 200})
    with pytest.raises(sweep.SweepError, match=r"holds another sweep .*config.train.steps: 100 -> 200"):
        sweep.run_sweep(other_base, tmp_path / "s", train_fn=fake_train, log=quiet)
    (tmp_path / "work").mkdir()
    (tmp_path / "work" / "config.json").write_text("{}")
    with pytest.raises(sweep.SweepError, match="is not empty and holds no sweep .config.json."):
        sweep.run_sweep(make_spec(), tmp_path / "work", train_fn=fake_train, log=quiet)
    assert (tmp_path / "work" / "config.json").read_text() == "{}"


def test_one_process_per_sweep_directory(tmp_path):
    os.makedirs(tmp_path / "s")
    with sweep._sweep_lock(str(tmp_path / "s")):
        with pytest.raises(sweep.SweepError, match=f"in use by another lmtrain sweep \\(pid {os.getpid()} on host "):
            sweep.run_sweep(make_spec(), tmp_path / "s", train_fn=fake_train, log=quiet)


def test_cross_validation_reports_mean_and_std_over_folds(tmp_path):
    spec = make_spec({"optimizer.lr": [1e-3, 1e-2]}, sampler="grid", n_trials=None, cv_folds=3)
    study = sweep.run_sweep(spec, tmp_path / "s", train_fn=fake_train, log=quiet)
    for t in study.trials:
        folds = [fake_final(sweep.trial_config(sweep.resolve_base_config(spec), {**t.params, "data.cv_folds": 3,
                                                                                   "data.cv_fold": k}))
                 for k in range(3)]
        assert t.user_attrs["fold_values"] == pytest.approx(folds)
        assert t.value == pytest.approx(sum(folds) / 3)
        assert t.user_attrs["cv_std"] == pytest.approx(math.sqrt(sum((f - t.value) ** 2 for f in folds) / 3))
        for k in range(3):
            assert calls(os.path.join(t.user_attrs["workdir"], f"fold_{k}")) == [0]
    with open(tmp_path / "s" / "trials.csv") as f:
        assert float(next(csv.DictReader(f))["std"]) == pytest.approx(math.sqrt(2 / 3) * 0.1)
    best = json.loads((tmp_path / "s" / "best_config.json").read_text())
    assert best["data"]["cv_folds"] == 0  # the winner trains on all the data


def test_cross_validation_folds_are_disjoint_and_complete(builtin_shards):
    """Each training document is in exactly one held-out fold, and each fold's training set is the rest."""
    from lmtrain.data import shards

    _, shards_dir = builtin_shards
    train = shards.split_source(shards_dir, "train")
    everything = [train[i] for i in range(len(train))]
    k = 3
    held_out = [shards.split_source(shards_dir, "validation", cv_folds=k, cv_fold=f) for f in range(k)]
    held_ids = [set(h.indices) for h in held_out]
    assert all(held_ids) and sum(map(len, held_ids)) == len(everything) == len(set().union(*held_ids))
    for f in range(k):
        trains = shards.FoldSubset(train, k, f, held_out=False)
        assert set(trains.indices).isdisjoint(held_ids[f]) and len(trains) + len(held_ids[f]) == len(everything)
        assert [held_out[f][j] for j in range(len(held_out[f]))] == [everything[i] for i in sorted(held_ids[f])]
    again = shards.split_source(shards_dir, "validation", cv_folds=k, cv_fold=1)
    assert again.indices == held_out[1].indices  # stable: a hash of the example, not a draw


def test_cross_validation_through_the_loaders(builtin_shards):
    """The trainer's data: fold f validates (its documents, in order) and the other folds train."""
    import numpy as np

    from lmtrain.data import shards
    from lmtrain.data.packing import RowPacker
    from lmtrain.data.pipeline import make_data
    from tests.helpers import small_config

    tok, shards_dir = builtin_shards
    cfg = small_config("llama", **{"data.source": "shards", "data.shards_dir": shards_dir, "data.tokenizer_dir": tok,
                                   "model.vocab_size": 1024, "data.cv_folds": 2, "data.cv_fold": 1})
    data = make_data(cfg, "/nonexistent-unused")
    n_train = len(shards.split_source(shards_dir, "train"))
    fold_docs = shards.split_source(shards_dir, "validation", cv_folds=2, cv_fold=1)
    assert data.train.num_documents == n_train - len(fold_docs)
    packer = RowPacker(cfg.data.seq_len + 1)
    expected = [r["tokens"] for i in range(len(fold_docs)) for r in packer.add(np.frombuffer(fold_docs[i], "<u2"))]
    expected += [r["tokens"] for r in packer.finish()]
    rows = np.concatenate([np.concatenate([b["inputs"], b["targets"][:, -1:]], axis=1) for b in data.eval_batches()])
    np.testing.assert_array_equal(rows[: len(expected)], np.stack(expected))
    assert not rows[len(expected):].any()  # the last batch's padding rows
    with pytest.raises(config_lib.ConfigError, match="data.cv_fold=2 is not one of the 2 folds"):
        make_data(small_config("llama", **{"data.source": "shards", "data.shards_dir": shards_dir,
                                           "data.tokenizer_dir": tok, "model.vocab_size": 1024, "data.cv_folds": 2,
                                           "data.cv_fold": 2}), "/nonexistent-unused")


def test_command_line(tmp_path, capsys):
    space = tmp_path / "space.yaml"
    space.write_text(textwrap.dedent("""
        base_config: tiny
        n_trials: 2
        pruner: none
        params:
          optimizer.lr: {type: float, low: 1.0e-4, high: 1.0e-2, log: true}
    """))
    argv = [f"--space={space}", f"--sweep-dir={tmp_path / 's'}", "--config.train.steps=40", "--config.train.eval_every=20",
            "--config.optimizer.warmup_steps=5"]
    assert sweep.main(argv, train_fn=fake_train) == 0
    out = capsys.readouterr().out
    assert "best trial" in out and "lmtrain train --config=" in out
    # resume with only the directory: its space and overrides come from sweep.json
    assert sweep.main([f"--sweep-dir={tmp_path / 's'}", "--n-trials=3"], train_fn=fake_train) == 0
    assert len(list(csv.DictReader(open(tmp_path / "s" / "trials.csv")))) == 3
    os.remove(tmp_path / "s" / "trials.csv")
    assert sweep.main([f"--sweep-dir={tmp_path / 's'}", "--n-trials=0"]) == 0  # results only, no trial
    assert len(list(csv.DictReader(open(tmp_path / "s" / "trials.csv")))) == 3
    assert sweep.main([f"--space={space}", f"--sweep-dir={tmp_path / 'new'}", "--n-trials=0"]) == 2
    assert "holds no sweep results yet" in capsys.readouterr().err
    space.write_text("params:\n  optimizer.lrr: [0.001]\n")
    assert sweep.main([f"--space={space}", f"--sweep-dir={tmp_path / 't'}"], train_fn=fake_train) == 2
    err = capsys.readouterr().err
    assert err.strip().count("\n") == 0 and "unknown config key 'optimizer.lrr'" in err and "Traceback" not in err


@pytest.mark.slow
@pytest.mark.heavy  # minutes on 2 CPU cores: run by `-m heavy` (.ci/run runs it)
def test_real_trainer_sweep_prunes_through_on_eval(tmp_path):
    # lr 1e-6 learns nothing in 5 steps, so its first validation loss is above trial 0's: the median pruner
    # (one startup trial) stops it there through the trainer's on_eval, with a checkpoint.
    space = tmp_path / "space.yaml"
    space.write_text(textwrap.dedent("""
        base_config: tiny:smoke
        overrides: {data.source: builtin, train.steps: 10, train.eval_every: 5, train.eval_batches: 1,
                    checkpoint.every: 5, optimizer.warmup_steps: 2, train.sample_tokens: 0,
                    logging.tensorboard: false, logging.loss_curve_png: false}
        sampler: grid
        pruner: {name: median, n_startup_trials: 1}
        params:
          optimizer.lr: [3.0e-3, 1.0e-6]
    """))
    assert sweep.main([f"--space={space}", f"--sweep-dir={tmp_path / 's'}"]) == 0
    rows = list(csv.DictReader(open(tmp_path / "s" / "trials.csv")))
    assert [(r["state"], r["last_step"]) for r in rows] == [("complete", "10"), ("pruned", "5")]
    assert float(rows[1]["val_loss"]) > float(rows[0]["val_loss"])
    assert all(os.path.isdir(os.path.join(r["workdir"], "checkpoints", "5")) for r in rows)
    best = config_lib.load_config(str(tmp_path / "s" / "best_config.json"))
    assert best.optimizer.lr == 3e-3


@pytest.mark.slow
@pytest.mark.heavy  # minutes on 2 CPU cores: run by `-m heavy` (.ci/run runs it)
def test_real_trainer_cross_validation_reports_mean_and_std_over_folds(builtin_shards, tmp_path, capsys):
    """`lmtrain sweep --cv-folds 2`: each fold trains the real trainer on the other fold and validates on its own."""
    import numpy as np

    tok, shards_dir = builtin_shards
    space = tmp_path / "space.yaml"
    space.write_text(textwrap.dedent(f"""
        base_config: tiny:smoke
        overrides: {{data.shards_dir: {shards_dir}, data.tokenizer_dir: {tok}, model.vocab_size: 1024,
                    data.seq_len: 32, model.max_seq_len: 32, data.batch_size: 8, train.steps: 4,
                    train.eval_every: 2, train.eval_batches: 0, checkpoint.every: 2, optimizer.warmup_steps: 1,
                    train.sample_tokens: 0, logging.tensorboard: false, logging.loss_curve_png: false}}
        sampler: grid
        pruner: none
        params:
          optimizer.lr: [3.0e-3]
    """))
    assert sweep.main([f"--space={space}", f"--sweep-dir={tmp_path / 's'}", "--cv-folds=2"]) == 0
    assert "±" in capsys.readouterr().out
    row = next(csv.DictReader(open(tmp_path / "s" / "trials.csv")))
    folds = []
    for k in range(2):
        fold_dir = os.path.join(row["workdir"], f"fold_{k}")
        cfg = config_lib.load_config(os.path.join(fold_dir, "config.json"))
        assert (cfg.data.cv_folds, cfg.data.cv_fold) == (2, k)
        done = json.loads(open(os.path.join(fold_dir, "done.json")).read())
        folds.append(done["metrics"]["val_loss"])  # each fold's own held-out validation loss
    assert folds[0] != folds[1]
    assert float(row["val_loss"]) == pytest.approx(np.mean(folds), rel=1e-6)
    assert float(row["std"]) == pytest.approx(np.std(folds), rel=1e-6)
    best = json.loads((tmp_path / "s" / "best.json").read_text())
    assert best["std"] == pytest.approx(np.std(folds), rel=1e-6)


def test_the_readme_s_example_space_is_valid(tmp_path):
    """The search space the README shows parses, names only real config keys, and builds trial configs."""
    import re

    readme = (pathlib.Path(__file__).resolve().parents[1] / "README.md").read_text()
    section = readme[readme.index("\n## Tune hyperparameters"):]
    yaml_text = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    (tmp_path / "space.yaml").write_text(yaml_text)
    spec = sweep.parse_spec(sweep.load_space(tmp_path / "space.yaml"), "README.md")
    base = sweep.resolve_base_config(spec)
    spec = sweep.validate_space(spec, base)
    assert {p.key for p in spec.params} >= {"optimizer.lr", "data.batch_size"}
    for p in spec.params:
        value = p.choices[-1] if p.kind == "categorical" else (int(p.high) if p.kind == "int" else p.high)
        sweep.trial_config(base, {p.key: value})
