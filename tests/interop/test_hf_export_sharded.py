"""`lmtrain export` restores the parameters sharded over the WORKDIR's training mesh and gathers one tensor at a
time: the files are bit-identical to a single-device export."""

import jax
import pytest

from lmtrain.interop import hf_export
from lmtrain.interop.hf_export import export_shardings, export_workdir
from lmtrain.train.trainer import train
from lmtrain.workdir import Workdir
from tests.helpers import small_config


@pytest.mark.slow
@pytest.mark.multidevice
def test_sharded_restore_exports_bit_identically_to_one_device(tmp_path, monkeypatch):
    assert jax.device_count() == 8, "tests/conftest.py should give 8 fake CPU devices"
    workdir = tmp_path / "work"
    cfg = small_config("llama", **{"mesh.data": 1, "mesh.fsdp": 4, "mesh.tensor": 2, "train.steps": 2, "model.vocab_size": 512,
                                   "train.eval_every": 0, "data.max_docs": 40, "checkpoint.async_save": False})
    train(cfg, workdir)

    restored = []
    real_load = Workdir.load_params

    def spy(*args, **kwargs):
        out = real_load(*args, **kwargs)
        restored.append(out)
        return out

    monkeypatch.setattr(Workdir, "load_params", spy)
    export_workdir(workdir, tmp_path / "sharded", max_shard_bytes=60_000)  # the WORKDIR's mesh: fsdp=4, tensor=2
    export_workdir(workdir, tmp_path / "single", max_shard_bytes=60_000, mesh_shape=(1, 1, 1))

    sharded, single = restored
    w_in = sharded["blocks"]["mlp"]["w_in"]  # [layers, embed (fsdp), mlp (tensor)]
    assert tuple(w_in.sharding.spec) == (None, "fsdp", "tensor") and len(w_in.sharding.device_set) == 8
    assert {s.data.shape for s in w_in.addressable_shards} == {(2, 64 // 4, 128 // 2)}
    assert sharded["head"]["w"].addressable_shards[0].data.shape == (64 // 4, 512 // 2)
    assert all(len(x.sharding.device_set) == 1 for x in jax.tree.leaves(single))

    files = sorted(p.name for p in (tmp_path / "single").iterdir())
    assert "model.safetensors.index.json" in files and sum(f.endswith(".safetensors") for f in files) > 1
    assert sorted(p.name for p in (tmp_path / "sharded").iterdir()) == files
    for name in files:
        assert (tmp_path / "sharded" / name).read_bytes() == (tmp_path / "single" / name).read_bytes(), name


def test_a_mesh_that_does_not_fit_restores_onto_one_device(capsys, tmp_path):
    cfg = small_config("llama", **{"mesh.data": 1, "mesh.fsdp": 16, "mesh.tensor": 1})
    assert export_shardings(cfg, tmp_path) is None
    assert "does not fit the 8 device(s) here" in capsys.readouterr().err
    shardings = export_shardings(cfg, tmp_path, (2, 2, 2))
    assert tuple(shardings["blocks"]["attn"]["wq"].spec) == (None, "fsdp", "tensor", None)
    assert export_shardings(cfg, tmp_path, (1, 1, 1)) is None
    with pytest.raises(hf_export.HFInteropError, match="mesh"):  # d_model 64 does not split 3 ways
        export_shardings(small_config("llama", **{"mesh.data": 1, "mesh.fsdp": 3, "mesh.tensor": 1}), tmp_path, (1, 3, 1))
