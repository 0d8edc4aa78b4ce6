"""Attention kernels against XLA's masked attention: the TPU splash kernel (Pallas interpret mode on CPU),
sharded and not, and the plumbing of cuDNN's packed layout for documents (its kernel needs a Hopper GPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lmtrain.config import DEFAULT_AXIS_RULES
from lmtrain.model import attention
from lmtrain.parallel.mesh import make_mesh
from lmtrain.parallel.partitioning import axis_rules


def _qkv(b, t, n, kv, h, seed=0):
    r = np.random.default_rng(seed)
    return tuple(jnp.asarray(r.normal(size=(b, t, heads, h)), jnp.float32) for heads in (n, kv, kv))


def _segments(b, t, bounds, padding=0):
    """Rows of documents ending at `bounds` (ids 1, 2, ...), then `padding` tokens of id 0."""
    row = np.zeros(t, np.int32)
    start = 0
    for i, end in enumerate(bounds):
        row[start:end] = i + 1
        start = end
    row[start:] = len(bounds) + 1
    if padding:
        row[t - padding:] = 0
    return jnp.asarray(np.stack([row] * b))


def _xla(q, k, v, seg, causal):
    return attention._dense_attention(q, k, v, seg, causal, "xla")


def _loss(fn):
    # A weighted sum, so every output element carries its own gradient.
    w = jnp.asarray(np.random.default_rng(9).normal(size=(2, 256, 4, 32)), jnp.float32)
    return lambda q, k, v: (fn(q, k, v) * w).sum()


@pytest.fixture
def interpret(monkeypatch):
    monkeypatch.setattr(attention, "SPLASH_INTERPRET", True)


@pytest.mark.slow
def test_splash_equals_xla_causal_documents_gqa_forward_and_gradients(interpret):
    q, k, v = _qkv(2, 256, 4, 2, 32)
    seg = jnp.concatenate([_segments(1, 256, [70, 200]), _segments(1, 256, [129])])  # a document across the tile edge

    def splash(q, k, v):
        return attention.attend(q, k, v, segment_ids_BxT=seg, causal=True, impl="splash")

    def xla(q, k, v):
        return _xla(q, k, v, seg, True)

    np.testing.assert_allclose(jax.jit(splash)(q, k, v), xla(q, k, v), atol=2e-5, rtol=1e-5)
    ours = jax.jit(jax.grad(_loss(splash), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.grad(_loss(xla), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", ours, ref):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")


def test_splash_equals_xla_bidirectional_with_padding(interpret):
    q, k, v = _qkv(1, 256, 2, 1, 32, seed=1)
    seg = _segments(1, 256, [100], padding=40)
    out = attention.attend(q, k, v, segment_ids_BxT=seg, causal=False, impl="splash")
    ref = _xla(q, k, v, seg, False)
    real = np.asarray(seg[0] > 0)  # padding queries' outputs are never used
    np.testing.assert_allclose(np.asarray(out)[:, real], np.asarray(ref)[:, real], atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("mesh_shape", [(2, 1, 2), (1, 2, 4)], ids=["data2-tensor2", "fsdp2-tensor4-kv-repeated"])
def test_splash_under_shard_map_equals_xla(interpret, mesh_shape):
    """Batch split over data/fsdp, heads over tensor; with 2 kv heads over 4 tensor shards the kv heads are
    repeated per query head. Forward and gradients."""
    q, k, v = _qkv(2, 256, 4, 2, 32, seed=2)
    seg = _segments(2, 256, [60, 190])
    mesh = make_mesh(mesh_shape)

    def splash(q, k, v):
        return attention.attend(q, k, v, segment_ids_BxT=seg, causal=True, impl="splash")

    with axis_rules(mesh, DEFAULT_AXIS_RULES):
        out = jax.jit(splash)(q, k, v)
        grads = jax.jit(jax.grad(_loss(splash), argnums=(0, 1, 2)))(q, k, v)
        text = jax.jit(splash).lower(q, k, v).as_text()
    assert "manual" in text.lower()  # the kernel ran per shard, not on gathered arrays
    np.testing.assert_allclose(out, _xla(q, k, v, seg, True), atol=2e-5, rtol=1e-5)
    ref = jax.grad(_loss(lambda q, k, v: _xla(q, k, v, seg, True)), argnums=(0, 1, 2))(q, k, v)
    for name, a, b in zip("qkv", grads, ref):
        np.testing.assert_allclose(a, b, atol=5e-5, rtol=1e-4, err_msg=f"d{name}")


def test_auto_picks_splash_on_tpu_cudnn_on_gpu(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    assert attention.choose_impl("auto", jnp.bfloat16, 4096, True) == "splash"
    assert attention.choose_impl("auto", jnp.float32, 384, False) == "splash"
    assert attention.choose_impl("auto", jnp.bfloat16, 200, True) == "xla"  # not a multiple of 128
    assert attention.choose_impl("xla", jnp.bfloat16, 4096, True) == "xla"
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert attention.choose_impl("auto", jnp.bfloat16, 4096, True) == "cudnn"


def test_auto_on_cpu_chunks_causal_attention_by_length(monkeypatch):
    monkeypatch.setattr(jax, "default_backend", lambda: "cpu")
    assert attention.choose_impl("auto", jnp.float32, 256, True) == "chunked"
    assert attention.choose_impl("auto", jnp.float32, 64, True) == "xla"
    assert attention.choose_impl("auto", jnp.float32, 256, False) == "xla"
    assert [attention.cpu_chunk(t) for t in (64, 128, 256, 512, 1024, 4096)] == [32, 32, 64, 64, 128, 256]


def test_chunked_default_block_equals_xla():
    q, k, v = _qkv(2, 256, 4, 2, 16, seed=7)
    seg = _segments(2, 256, [50, 130])
    np.testing.assert_allclose(attention.chunked_causal_attention(q, k, v, seg), _xla(q, k, v, seg, True), atol=2e-6)


def test_splash_refuses_cpu_and_odd_lengths():
    q, k, v = _qkv(1, 256, 2, 2, 32)
    with pytest.raises(ValueError, match="runs on TPU only"):
        attention.attend(q, k, v, impl="splash")
    q, k, v = _qkv(1, 200, 2, 2, 32)
    with pytest.raises(ValueError, match="multiples of 128"):
        attention.splash_attention(q, k, v, interpret=True)


# ---------------------------------------------------------------------------------------------------------------
# cuDNN packed layout
# ---------------------------------------------------------------------------------------------------------------


def test_segments_to_packed_lengths_and_offsets():
    seg = jnp.asarray([[1, 1, 1, 2, 2, 3, 0, 0], [1, 1, 1, 1, 1, 1, 1, 1]], jnp.int32)
    lengths, offsets, count = attention.segments_to_packed(seg, 5)
    np.testing.assert_array_equal(lengths, [[3, 2, 1, 2, -1], [8, -1, -1, -1, -1]])
    np.testing.assert_array_equal(offsets, [[0, 3, 5, 6, -1, -1], [0, -1, -1, -1, -1, -1]])
    np.testing.assert_array_equal(count, [4, 1])
    _, _, count = attention.segments_to_packed(seg, 2)  # cut short, but the count is the real one
    np.testing.assert_array_equal(count, [4, 1])


def _packed_reference(q, k, v, lengths, offsets, *, causal):
    """What cuDNN's packed layout computes, read from the lengths and offsets alone: each row's document i
    is tokens [offsets[i], offsets[i] + lengths[i]), attending only within itself."""
    t = q.shape[1]
    pos = jnp.arange(t)
    starts, lens = offsets[:, :-1], lengths
    inside_BxMxT = (pos[None, None] >= starts[:, :, None]) & (pos[None, None] < (starts + lens)[:, :, None])
    inside_BxMxT &= lens[:, :, None] > 0
    doc_BxT = jnp.where(inside_BxMxT.any(1), jnp.argmax(inside_BxMxT, axis=1), -1)
    mask = (doc_BxT[:, :, None] == doc_BxT[:, None, :]) & (doc_BxT[:, :, None] >= 0)
    if causal:
        mask &= pos[:, None] >= pos[None, :]
    k = jnp.repeat(k, q.shape[2] // k.shape[2], axis=2)
    v = jnp.repeat(v, q.shape[2] // v.shape[2], axis=2)
    return jax.nn.dot_product_attention(q, k, v, mask=mask[:, None])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_cudnn_packed_arguments_give_the_document_mask(monkeypatch, causal):
    """The lengths and offsets handed to cuDNN describe exactly the documents of the segment ids: attention
    computed from them alone equals XLA's with the dense segment mask."""
    seen = {}

    def fake(q, k, v, lengths, offsets, *, causal):
        seen["k_heads"] = k.shape[2]
        return _packed_reference(q, k, v, lengths, offsets, causal=causal)

    monkeypatch.setattr(attention, "_cudnn_packed_call", fake)
    monkeypatch.setattr(attention, "_cudnn_kv_offsets_scaled_by_query_heads", lambda: False)
    q, k, v = _qkv(2, 64, 4, 2, 16, seed=3)
    seg = jnp.concatenate([_segments(1, 64, [10, 11, 40], padding=5 if not causal else 0), _segments(1, 64, [])])
    out = jax.jit(lambda q, k, v: attention.cudnn_packed_attention(q, k, v, seg, causal=causal, max_segments=4,
                                                                   dense_impl="xla"))(q, k, v)
    ref = _xla(q, k, v, seg, causal)
    real = np.asarray(seg > 0) if not causal else np.ones(seg.shape, bool)
    np.testing.assert_allclose(np.asarray(out)[real], np.asarray(ref)[real], atol=1e-5, rtol=1e-5)
    assert seen["k_heads"] == 2  # grouped-query heads go to cuDNN as they are


def test_cudnn_packed_falls_back_to_the_dense_mask_past_max_segments(monkeypatch):
    monkeypatch.setattr(attention, "_cudnn_packed_call", lambda q, k, v, lengths, offsets, *, causal: jnp.zeros_like(q))
    monkeypatch.setattr(attention, "_cudnn_kv_offsets_scaled_by_query_heads", lambda: False)
    q, k, v = _qkv(2, 32, 2, 2, 8, seed=4)
    few, many = _segments(2, 32, [16]), _segments(2, 32, [4, 8, 16])  # 2 and 4 documents per row

    def run(seg):
        return jax.jit(lambda q, k, v, s: attention.cudnn_packed_attention(q, k, v, s, max_segments=3, dense_impl="xla"))(
            q, k, v, seg)

    np.testing.assert_array_equal(run(few), 0.0)  # the packed kernel ran
    np.testing.assert_allclose(run(many), _xla(q, k, v, many, True), atol=1e-6)  # the dense kernel ran


@pytest.mark.parametrize("buggy", [True, False])
def test_cudnn_packed_repeats_kv_heads_only_where_jax_mis_scales_kv_offsets(monkeypatch, buggy):
    seen = {}

    def fake(q, k, v, lengths, offsets, *, causal):
        seen["k_heads"] = k.shape[2]
        return _packed_reference(q, k, v, lengths, offsets, causal=causal)

    monkeypatch.setattr(attention, "_cudnn_packed_call", fake)
    monkeypatch.setattr(attention, "_cudnn_kv_offsets_scaled_by_query_heads", lambda: buggy)
    q, k, v = _qkv(1, 32, 4, 1, 8, seed=5)
    seg = _segments(1, 32, [9])
    out = attention.cudnn_packed_attention(q, k, v, seg, max_segments=4, dense_impl="xla")
    assert seen["k_heads"] == (4 if buggy else 1)
    np.testing.assert_allclose(out, _xla(q, k, v, seg, True), atol=1e-5)


def test_kv_offsets_probe_reads_this_jax():
    """The probe runs against the installed private API (it would raise if the API moved)."""
    assert attention._cudnn_kv_offsets_scaled_by_query_heads() in (True, False)
    assert attention.cudnn_packing_available() is False  # CPU


def test_attend_routes_documents_to_the_packed_layout_on_cudnn(monkeypatch):
    calls = []
    monkeypatch.setattr(attention, "cudnn_packing_available", lambda: True)
    monkeypatch.setattr(attention, "cudnn_packed_attention", lambda q, k, v, s, *, causal: calls.append(causal) or q)
    monkeypatch.setattr(attention, "_dense_attention", lambda q, k, v, s, causal, impl: calls.append(impl) or q)
    q, k, v = _qkv(1, 32, 2, 2, 8)
    attention.attend(q, k, v, segment_ids_BxT=_segments(1, 32, [5]), causal=False, impl="cudnn")
    attention.attend(q, k, v, impl="cudnn")  # no documents: plain causal cuDNN
    assert calls == [False, "cudnn"]


@pytest.mark.skipif(not attention.cudnn_packing_available(), reason="needs a Hopper (or newer) GPU with cuDNN >= 9.6")
def test_cudnn_packed_kernel_equals_dense_mask_on_gpu():
    """On the GPU itself: the real packed cuDNN kernel against the dense segment mask (bf16), GQA included."""
    q, k, v = (x.astype(jnp.bfloat16) for x in _qkv(2, 512, 8, 2, 64, seed=6))
    seg = jnp.concatenate([_segments(1, 512, [100, 101, 300]), _segments(1, 512, [256])])

    def packed(q, k, v):
        return attention.attend(q, k, v, segment_ids_BxT=seg, causal=True, impl="cudnn")

    def dense(q, k, v):
        return attention._dense_attention(q, k, v, seg, True, "xla")

    def loss(fn):
        return lambda q, k, v: (fn(q, k, v).astype(jnp.float32) ** 2).sum()

    np.testing.assert_allclose(np.asarray(jax.jit(packed)(q, k, v), np.float32), np.asarray(dense(q, k, v), np.float32),
                               atol=2e-2, rtol=2e-2)
    ours = jax.jit(jax.grad(loss(packed), argnums=(0, 1, 2)))(q, k, v)
    ref = jax.jit(jax.grad(loss(dense), argnums=(0, 1, 2)))(q, k, v)
    for name, a, b in zip("qkv", ours, ref):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=5e-2, rtol=5e-2,
                                   err_msg=f"d{name}")
