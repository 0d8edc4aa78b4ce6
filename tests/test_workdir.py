"""`Workdir`: one reader of a run's directory (issue 18). The checkpoints here are written by the training
Checkpointer with numpy parameters of the model's shapes, so no training runs and every comparison is exact."""

from __future__ import annotations

import json

import jax
import numpy as np
import pytest

from lmtrain.config import to_json
from lmtrain.model import ModelConfig, ModelDef
from lmtrain.train.checkpoint import Checkpointer, CheckpointError
from lmtrain.workdir import Workdir, WorkdirError, is_hf_dir, read_labels
from tests.helpers import small_config

VAL_LOSS = {1: 3.0, 2: 2.0, 3: 2.5}  # step 2 is the best, step 3 the latest


def _config(**overrides):
    return small_config("llama", **{"checkpoint.async_save": False, **overrides})


def _draw(cfg, seed: int) -> dict:
    """Numpy parameters of the config's model, different for every seed."""
    rng = np.random.default_rng(seed)
    shapes = ModelDef(ModelConfig.from_config(cfg.model).for_training()).shapes
    return jax.tree.map(lambda s: (0.02 * rng.standard_normal(s.shape)).astype(s.dtype), shapes)


def _write_run(path, cfg, steps: dict[int, dict]) -> None:
    """A WORKDIR with config.json and a checkpoint of `params` at each step (val_loss as VAL_LOSS says)."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(to_json(cfg))
    ck = Checkpointer(path, keep=len(steps), async_save=False)
    try:
        for step, params in steps.items():
            loss = VAL_LOSS[step]
            ck.save(step, {"params": params, "step": np.int32(step)}, {"step": step}, {"eval": {"val_loss": loss}},
                    {"val_loss": loss})
    finally:
        ck.close()


def _assert_equal(got: dict, want: dict) -> None:
    assert jax.tree.structure(got) == jax.tree.structure(want)
    for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(got)[0], jax.tree.leaves(want), strict=True):
        np.testing.assert_array_equal(np.asarray(a), b, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """(Workdir, {step: params}) with checkpoints at steps 1, 2 (best) and 3 (latest)."""
    path = tmp_path_factory.mktemp("wd") / "run"
    cfg = _config()
    saved = {step: _draw(cfg, step) for step in VAL_LOSS}
    _write_run(path, cfg, saved)
    return Workdir(path), saved


# ---------------------------------------------------------------------------------------------- files


def test_config_tokenizer_done_and_metrics(tmp_path, tokenizer_512):
    cfg = _config(**{"data.tokenizer_dir": tokenizer_512, "train.steps": 7})
    (tmp_path / "config.json").write_text(to_json(cfg))
    work = Workdir(tmp_path)
    assert work.config.train.steps == 7
    assert str(work.tokenizer_dir) == tokenizer_512
    assert work.tokenizer().encode("hello world")
    assert work.done() is None and work.metrics() == []
    (tmp_path / "done.json").write_text(json.dumps({"step": 7, "best_step": 6}))
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "loss": 5.0}\n{"step": 2, "loss": 4.5}\n{"step": 3, "lo')
    assert work.done() == {"step": 7, "best_step": 6}
    assert work.metrics() == [{"step": 1, "loss": 5.0}, {"step": 2, "loss": 4.5}], "a line cut by a kill is skipped"

    imported = tmp_path / "imported"
    imported.mkdir()
    (imported / "config.json").write_text(to_json(_config()))
    assert Workdir(imported).tokenizer_dir == Workdir(imported).path / "tokenizer", "where lmtrain import puts it"


def test_config_errors_name_the_directory(tmp_path):
    with pytest.raises(WorkdirError, match=f"{tmp_path} has no config.json; is it an lmtrain WORKDIR"):
        Workdir(tmp_path).config  # noqa: B018
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    with pytest.raises(WorkdirError, match="is a Hugging Face model directory.*lmtrain import"):
        Workdir(tmp_path).config  # noqa: B018
    (tmp_path / "config.json").write_text("{")
    with pytest.raises(WorkdirError, match="config.json: not valid JSON"):
        Workdir(tmp_path).config  # noqa: B018


@pytest.mark.parametrize("text, want", [
    ('["neg", "pos"]', ["neg", "pos"]),  # what the classify and token_classify tasks and lmtrain import write
    ('{"labels": ["neg", "pos", "mixed"]}', ["neg", "pos", "mixed"]),  # the form lmtrain eval accepted
    ("[0, 1, 2]", ["0", "1", "2"]),  # integer class names
])
def test_labels_in_every_accepted_form(tmp_path, text, want):
    (tmp_path / "labels.json").write_text(text)
    assert Workdir(tmp_path).labels() == want


@pytest.mark.parametrize("text", ["[\"neg\", ", "[]", '{"classes": ["a"]}', '[["a"], "b"]', '"neg"', "[null]"])
def test_a_malformed_labels_file_is_a_clear_error(tmp_path, text):
    (tmp_path / "labels.json").write_text(text)
    with pytest.raises(WorkdirError, match=f"{tmp_path / 'labels.json'}: .*class names in class order"):
        Workdir(tmp_path).labels()


def test_no_labels_file_is_none(tmp_path):
    assert Workdir(tmp_path).labels() is None and read_labels(tmp_path / "labels.json") is None


def test_model_config_takes_the_classes_from_labels_in_either_form(tmp_path):
    (tmp_path / "config.json").write_text(to_json(_config(**{"task.name": "classify"})))
    (tmp_path / "labels.json").write_text('{"labels": ["a", "b", "c"]}')
    model_cfg = Workdir(tmp_path).model_config()
    assert model_cfg.head == "classify" and model_cfg.num_labels == 3
    (tmp_path / "labels.json").write_text('["a", "b", "c", "d", "e"]')
    assert Workdir(tmp_path).model_config().num_labels == 5


def test_is_hf_dir(tmp_path, run):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"architectures": ["LlamaForCausalLM"], "model_type": "llama"}))
    only_type = tmp_path / "only_type"
    only_type.mkdir()
    (only_type / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "config.json").write_text("{")
    assert is_hf_dir(hf) and is_hf_dir(str(only_type))
    assert not is_hf_dir(run[0].path), "an lmtrain WORKDIR"
    assert not is_hf_dir(empty) and not is_hf_dir(broken) and not is_hf_dir(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("which, step", [("latest", 3), ("best", 2), (1, 1), ("2", 2)])
def test_load_params_returns_what_was_saved(run, which, step):
    work, saved = run
    assert work.select_step(which) == step
    _assert_equal(work.load_params(which), saved[step])


def test_describe_names_the_step_and_why(run):
    work, _ = run
    assert work.describe("latest") == "step 3 (latest)"
    assert work.describe("best") == "step 2 (best by val_loss=2)"
    assert work.describe(1) == "step 1"


def test_an_unknown_step_or_which_is_a_clear_error(run):
    work, _ = run
    with pytest.raises(CheckpointError, match=r"no checkpoint for step 9 in .*checkpoints; it has steps \[1, 2, 3\]"):
        work.load_params(9)
    with pytest.raises(WorkdirError, match="which checkpoint 'newest': use 'latest', 'best', 'start' or a step"):
        work.load_params("newest")


def test_no_checkpoint_and_a_half_written_one_name_the_workdir(tmp_path):
    (tmp_path / "config.json").write_text(to_json(_config()))
    with pytest.raises(WorkdirError, match=f"{tmp_path} holds no complete checkpoint .*train it first"):
        Workdir(tmp_path).load_params()
    (tmp_path / "checkpoints" / "5.orbax-checkpoint-tmp-123").mkdir(parents=True)  # a save killed half-way
    with pytest.raises(WorkdirError, match=f"{tmp_path} holds no complete checkpoint"):
        Workdir(tmp_path).load_params("latest")


def test_a_checkpoint_of_another_shape_is_a_clear_error(tmp_path):
    _write_run(tmp_path, _config(), {1: _draw(_config(), 1)})
    (tmp_path / "config.json").write_text(to_json(_config(**{"model.d_ff": 256})))
    with pytest.raises(WorkdirError, match="holds parameters of another shape than .*config.json builds .*w_in"):
        Workdir(tmp_path).load_params()


def test_start_is_what_training_began_with(tmp_path, run):
    """'start' = the seed's initialisation under train.init_from (here a WORKDIR's best checkpoint, which holds
    every parameter); 'latest' of a WORKDIR not trained yet (lmtrain import) is the same."""
    source, saved = run
    cfg = _config(**{"train.init_from": str(source.path), "train.init_from_which": "best"})
    (tmp_path / "config.json").write_text(to_json(cfg))
    work = Workdir(tmp_path)
    _assert_equal(work.load_params("start"), saved[2])
    _assert_equal(work.load_params("latest"), saved[2])
    assert work.describe("start").startswith("start: the parameters training began with (seed 0")
    with pytest.raises(WorkdirError, match="holds no complete checkpoint .*or use 'start'"):
        work.load_params("best")


def test_parameters_a_checkpoint_does_not_hold_come_from_start(tmp_path, run):
    """A run that froze the embedding (as LoRA freezes the base) saves only what it trained: the embedding is
    rebuilt from train.init_from, the rest read from the checkpoint."""
    source, saved = run
    cfg = _config(**{"train.init_from": str(source.path), "train.init_from_which": "1"})
    trained = _draw(cfg, 7)
    _write_run(tmp_path, cfg, {3: {k: v for k, v in trained.items() if k != "embed"}})
    work = Workdir(tmp_path)
    assert "embed" not in work.trained_paths() and "head/w" in work.trained_paths()
    _assert_equal(work.load_params(), {**trained, "embed": saved[1]["embed"]})


@pytest.mark.multidevice
def test_sharded_placement_on_the_training_mesh(tmp_path):
    assert jax.device_count() == 8, "tests/conftest.py should give 8 fake CPU devices"
    cfg = _config(**{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2})
    saved = _draw(cfg, 3)
    _write_run(tmp_path, cfg, {3: saved})
    work = Workdir(tmp_path)
    mesh, shardings = work.place()
    assert dict(mesh.shape) == {"data": 1, "fsdp": 4, "tensor": 2}
    for params in (work.load_params("latest", shardings), work.load_params(3, mesh=mesh)):
        w_in = params["blocks"]["mlp"]["w_in"]  # [layers, embed (fsdp), mlp (tensor)]
        assert tuple(w_in.sharding.spec) == (None, "fsdp", "tensor") and len(w_in.sharding.device_set) == 8
        assert {s.data.shape for s in w_in.addressable_shards} == {(2, 64 // 4, 128 // 2)}
        _assert_equal(params, saved)
    assert work.place((1, 1, 1)) == (None, None), "one device"
    one = work.load_params()
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(one))


def test_a_damaged_checkpoint_names_it_and_what_to_do(tmp_path):
    saved = {step: _draw(_config(), step) for step in (1, 2)}
    _write_run(tmp_path, _config(), saved)
    for f in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 10_000:
            f.write_bytes(f.read_bytes()[:100])  # a copy cut short
    with pytest.raises(WorkdirError, match=r"checkpoint .*checkpoints/2 of .* could not be read .*Use another step "
                                           r"\(its steps: \[1, 2\]\)"):
        Workdir(tmp_path).load_params("latest")
    _assert_equal(Workdir(tmp_path).load_params(1), saved[1])
