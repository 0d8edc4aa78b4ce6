"""Attention kernels behind one call, `attend`: XLA's fused attention, cuDNN flash attention (GPU),
the Pallas splash attention kernel (TPU), and query-chunked causal attention (fast on CPU); causal or
bidirectional, with document masking.

Model code calls `attend` and never picks a kernel itself; `attention_impl='auto'` chooses by backend.

Document masking (segment ids) never builds a dense [B, 1, T, S] mask on TPU (splash takes the ids)
nor, on Hopper GPUs with cuDNN, for up to CUDNN_MAX_SEGMENTS documents per row (cuDNN's packed
layout takes per-document offsets and lengths). Both read a document as one contiguous run of equal
ids, which is what `lmtrain.data.packing` produces.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import PartitionSpec

from lmtrain.parallel import partitioning

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked", "splash")
# Splash tiles: the largest that divides the sequence. 512 is what MaxText uses on v4/v5; the kernel
# needs multiples of 128 (TPU lanes), so a sequence that 128 does not divide goes to XLA.
SPLASH_BLOCKS = (512, 256, 128)
# cuDNN's packed layout is compiled for a fixed number of documents per row and allocates its softmax
# statistics as [B * this, N, T] float32, so it stays small; a batch with a row of more documents
# than this takes the dense-mask kernel instead (decided on device, per call).
CUDNN_MAX_SEGMENTS = 16
# Tests set this to run the splash kernel in Pallas interpret mode off TPU (slow; for equality tests).
SPLASH_INTERPRET = False


def cpu_chunk(length: int) -> int:
    """Query block of the chunked attention: the largest power of two up to 4 * sqrt(length), at least 16.

    Smaller blocks skip more of the masked upper triangle, larger ones make better matmuls. Measured on
    XLA:CPU (2 cores, fwd+bwd, see BENCHMARKS.md): the best block was 32 at T=128, 64 at T=256, 64-128
    at T=512 and 128 at T=1024, which this rule gives."""
    chunk = 16
    while chunk * 2 <= 4 * math.sqrt(length):
        chunk *= 2
    return chunk


def splash_block(length: int) -> int:
    """The splash tile for this sequence length, 0 when the kernel cannot take it."""
    return next((b for b in SPLASH_BLOCKS if length % b == 0), 0)


def choose_impl(requested: str, dtype, length: int, causal: bool) -> str:
    """'auto' picks the splash kernel on TPU (sequence a multiple of 128), cuDNN flash attention on GPU
    (bf16/fp16), query-chunked causal attention on CPU from 128 tokens, and XLA's fused attention
    otherwise."""
    if requested != "auto":
        return requested
    backend = jax.default_backend()
    if backend == "tpu" and splash_block(length):
        return "splash"
    if backend == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if causal and backend == "cpu" and length >= 128:
        return "chunked"
    return "xla"


def chunked_causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT=None, chunk: int = 0):
    """Causal attention computed one block of `chunk` queries (default `cpu_chunk(T)`) at a time against
    only the keys at or before the block: about half the FLOPs of the full masked product and a
    [chunk, T] score tile instead of [T, T]. Same result as jax.nn.dot_product_attention(is_causal=True)
    with the segment mask."""
    b, t, n, h = q_BxTxNxH.shape
    chunk = chunk or cpu_chunk(t)
    kv_heads = k_BxTxKxH.shape[2]
    q_BxTxKxGxH = q_BxTxNxH.reshape(b, t, kv_heads, n // kv_heads, h)
    outs = []
    for start in range(0, t, chunk):
        stop = min(start + chunk, t)
        scores = jnp.einsum("btkgh,bskh->bkgts", q_BxTxKxGxH[:, start:stop], k_BxTxKxH[:, :stop],
                            preferred_element_type=jnp.float32) / math.sqrt(h)
        mask_TxS = jnp.arange(start, stop)[:, None] >= jnp.arange(stop)[None, :]
        if segment_ids_BxT is not None:
            same_BxTxS = segment_ids_BxT[:, start:stop, None] == segment_ids_BxT[:, None, :stop]
            mask = (mask_TxS & same_BxTxS)[:, None, None]
        else:
            mask = mask_TxS
        probs = jax.nn.softmax(jnp.where(mask, scores, -1e30), axis=-1).astype(v_BxTxKxH.dtype)
        outs.append(jnp.einsum("bkgts,bskh->btkgh", probs, v_BxTxKxH[:, :stop]))
    return jnp.concatenate(outs, axis=1).reshape(b, t, n, h)


# ----------------------------------------------------------------------------------------------------------------
# TPU: Pallas splash attention
# ----------------------------------------------------------------------------------------------------------------


@functools.lru_cache(maxsize=64)
def _splash_kernel(n_heads: int, t: int, s: int, causal: bool, block: int, interpret: bool):
    """One kernel per local shape: the block-sparsity tables are computed on the host from the mask
    (causal or full), once, and the segment ids are applied inside the kernel."""
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    one = sm.CausalMask((t, s)) if causal else sm.FullMask((t, s))
    blocks = sk.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block, block_q_dkv=block,
                           block_kv_dkv=block, block_kv_dkv_compute=block, block_q_dq=block, block_kv_dq=block)
    # Built eagerly, even when first asked for inside a trace: the cached tables must be concrete arrays.
    with jax.ensure_compile_time_eval():
        return sk.make_splash_mha(sm.MultiHeadMask([one] * n_heads), block_sizes=blocks, head_shards=1,
                                  q_seq_shards=1, interpret=interpret)


def _mesh_axes_size(mesh, part) -> int:
    if part is None:
        return 1
    return math.prod(mesh.shape[a] for a in ((part,) if isinstance(part, str) else part))


def splash_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT=None, *, causal: bool = True,
                     interpret: bool | None = None, block: int = 0):
    """The Pallas splash (block-sparse flash) attention kernel for TPU, with segment ids and grouped-query
    heads. Same result as the XLA path with the segment mask.

    The kernel works on one example's [heads, length, head_dim]: it is vmapped over the batch and, inside
    `axis_rules`, run under shard_map with the batch split as the `batch` rule says and the heads as
    `act_heads` / `act_kv_heads` say. The sequence is never split (the kernel cannot split keys), so a
    rule that shards `length` is gathered here. Kv heads that the head split does not divide are repeated
    to one per query head first.
    """
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk

    b, t, n, h = q_BxTxNxH.shape
    s = k_BxSxKxH.shape[1]
    block = block or splash_block(math.gcd(t, s))
    if not block or t % block or s % block:
        raise ValueError(f"model.attention_impl='splash' needs sequence lengths that are multiples of 128 (got {t} "
                         f"queries, {s} keys); use 'auto' or 'xla'.")
    if interpret is None:
        interpret = SPLASH_INTERPRET
    if jax.default_backend() != "tpu" and not interpret:
        raise ValueError(f"model.attention_impl='splash' runs on TPU only (the backend is "
                         f"{jax.default_backend()}); use 'auto'.")
    # The kernel does not scale the logits: scale the queries, as XLA's attention does before the product.
    q_BxTxNxH = q_BxTxNxH * jnp.asarray(1.0 / math.sqrt(h), q_BxTxNxH.dtype)

    def local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT):
        kernel = _splash_kernel(q_BxTxNxH.shape[2], t, s, causal, block, interpret)
        q_BxNxTxH, k_BxKxSxH, v_BxKxSxH = (x.transpose(0, 2, 1, 3) for x in (q_BxTxNxH, k_BxSxKxH, v_BxSxKxH))
        if segment_ids_BxT is None:
            out_BxNxTxH = jax.vmap(kernel)(q_BxNxTxH, k_BxKxSxH, v_BxKxSxH)
        else:
            out_BxNxTxH = jax.vmap(lambda q, k, v, ids: kernel(q, k, v, segment_ids=sk.SegmentIds(ids, ids)))(
                q_BxNxTxH, k_BxKxSxH, v_BxKxSxH, segment_ids_BxT)
        return out_BxNxTxH.transpose(0, 2, 1, 3)

    # Read, not written: the mesh and rules that `partitioning.axis_rules` made active for this trace.
    active = partitioning._ACTIVE.get()
    if active is None or active[0].size == 1:
        return local(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)
    mesh, rules = active
    batch, _, heads, _ = partitioning.logical_to_spec(("batch", None, "act_heads", None), rules, mesh)
    kv_heads = partitioning.logical_to_spec(("batch", None, "act_kv_heads", None), rules, mesh)[2]
    if b % _mesh_axes_size(mesh, batch):
        batch = None
    if heads is None or n % _mesh_axes_size(mesh, heads):
        heads = kv_heads = None
    kv = k_BxSxKxH.shape[2]
    if heads is not None and (kv_heads != heads or kv % _mesh_axes_size(mesh, heads)):
        # A shard must hold the kv heads of its own query heads: one kv head per query head does.
        k_BxSxKxH, v_BxSxKxH = (jnp.repeat(x, n // kv, axis=2) for x in (k_BxSxKxH, v_BxSxKxH))
        kv_heads = heads
    qo_spec = PartitionSpec(batch, None, heads, None)
    kv_spec = PartitionSpec(batch, None, kv_heads, None)
    seg_spec = PartitionSpec(batch, None)
    if segment_ids_BxT is None:
        fn = jax.shard_map(lambda q, k, v: local(q, k, v, None), mesh=mesh, in_specs=(qo_spec, kv_spec, kv_spec),
                           out_specs=qo_spec, check_vma=False)
        return fn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(qo_spec, kv_spec, kv_spec, seg_spec), out_specs=qo_spec,
                       check_vma=False)
    return fn(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)


# ----------------------------------------------------------------------------------------------------------------
# GPU: cuDNN's packed (varlen) layout for document masking
# ----------------------------------------------------------------------------------------------------------------


def segments_to_packed(segment_ids_BxT, max_segments: int):
    """Per-row document lengths and start offsets in the form cuDNN's packed layout takes: lengths [B, M],
    offsets [B, M + 1], -1 past a row's last document; and the number of documents per row [B].

    A document is a run of equal ids. Rows with more than `max_segments` documents are cut short here;
    the caller checks the counts."""
    b, t = segment_ids_BxT.shape
    starts_BxT = jnp.concatenate([jnp.ones((b, 1), bool), segment_ids_BxT[:, 1:] != segment_ids_BxT[:, :-1]], axis=1)
    index_BxT = jnp.cumsum(starts_BxT, axis=1, dtype=jnp.int32) - 1
    count_B = index_BxT[:, -1] + 1
    lengths_BxM = jnp.zeros((b, max_segments), jnp.int32).at[jnp.arange(b)[:, None], index_BxT].add(1, mode="drop")
    offsets_BxM = jnp.cumsum(lengths_BxM, axis=1, dtype=jnp.int32) - lengths_BxM
    used_BxM = jnp.arange(max_segments)[None, :] < count_B[:, None]
    lengths_BxM = jnp.where(used_BxM, lengths_BxM, -1)
    offsets_BxM1 = jnp.concatenate([jnp.where(used_BxM, offsets_BxM, -1), jnp.full((b, 1), -1, jnp.int32)], axis=1)
    return lengths_BxM, offsets_BxM1, count_B


@functools.cache
def _cudnn_kv_offsets_scaled_by_query_heads() -> bool:
    """Whether this JAX scales the kv offsets by the query's heads (wrong under GQA; jax-ml/jax#39521).

    Probed on the function itself, on host arrays, rather than guessed from the version."""
    from jax._src.cudnn import fused_attention_stablehlo as fa

    class _Shape:
        def __init__(self, shape):
            self.shape = shape

    one = np.array([[1, 1]], np.int32)
    offsets = np.array([[0, 1, -1]], np.int32)
    kv_offsets = fa._fix_seqlen_offsets(one, one, offsets, offsets, _Shape((1, 2, 2, 1)), _Shape((1, 2, 1, 1)))[3]
    return int(np.asarray(kv_offsets)[0, 1]) == 2


@functools.cache
def cudnn_packing_available() -> bool:
    """cuDNN's packed layout: this JAX has it (a private API) and the GPU is Hopper or newer."""
    if jax.default_backend() != "gpu":
        return False
    try:
        import inspect

        from jax._src.cudnn import fused_attention_stablehlo as fa

        params = inspect.signature(fa.dot_product_attention).parameters
        if not {"q_seqlen", "kv_seqlen", "q_offsets", "kv_offsets", "mask_type"} <= set(params):
            return False
        return bool(fa.check_compute_capability("9.0")) and fa.check_cudnn_version() >= 90600
    except Exception:  # an older or newer JAX without this private API: keep the dense mask
        return False


def _cudnn_packed_call(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, lengths_BxM, offsets_BxM1, *, causal: bool):
    from jax._src.cudnn import fused_attention_stablehlo as fa

    mask_type = fa.MaskType.PADDING_CAUSAL if causal else fa.MaskType.PADDING
    return fa.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, None, None, lengths_BxM, lengths_BxM, offsets_BxM1,
                                    offsets_BxM1, scale=1.0 / math.sqrt(q_BxTxNxH.shape[-1]), mask_type=mask_type)


def cudnn_packed_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, *, causal: bool = True,
                           max_segments: int = CUDNN_MAX_SEGMENTS, dense_impl: str = "cudnn"):
    """Document-masked attention through cuDNN's packed layout (no [B, 1, T, S] mask). When a row holds
    more than `max_segments` documents the whole call takes the dense-mask kernel `dense_impl` instead."""
    n, kv = q_BxTxNxH.shape[2], k_BxSxKxH.shape[2]
    lengths_BxM, offsets_BxM1, count_B = segments_to_packed(segment_ids_BxT, max_segments)
    pk, pv = k_BxSxKxH, v_BxSxKxH
    if kv != n and _cudnn_kv_offsets_scaled_by_query_heads():
        pk, pv = (jnp.repeat(x, n // kv, axis=2) for x in (k_BxSxKxH, v_BxSxKxH))

    def packed():
        return _cudnn_packed_call(q_BxTxNxH, pk, pv, lengths_BxM, offsets_BxM1, causal=causal)

    def dense():
        return _dense_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, causal, dense_impl)

    return jax.lax.cond(jnp.all(count_B <= max_segments), packed, dense)


# ----------------------------------------------------------------------------------------------------------------


def _segment_mask(segment_ids_BxT, causal: bool):
    """[B, 1, T, S] True where a query may attend to a key within its segment (None without segment ids)."""
    if segment_ids_BxT is None:
        return None
    mask_Bx1xTxS = segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]
    if not causal:
        # Padding (segment 0) keys are never attended to; a padding query still sees the other
        # padding slots so that its softmax row is not empty (its output is never used).
        mask_Bx1xTxS = mask_Bx1xTxS & ((segment_ids_BxT[:, None, None, :] > 0) | (segment_ids_BxT[:, None, :, None] == 0))
    return mask_Bx1xTxS


def _dense_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, causal: bool, impl: str):
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=_segment_mask(segment_ids_BxT, causal),
                                        is_causal=causal, implementation=impl)


def dropout_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, causal: bool, rate: float, key):
    """Attention with dropout on the probabilities (BERT's attention_probs_dropout_prob), written out: the
    fused kernels have no dropout. Training only; the same masks as the dense path."""
    n, kv, h = q_BxTxNxH.shape[2], k_BxSxKxH.shape[2], q_BxTxNxH.shape[3]
    if kv != n:
        k_BxSxKxH, v_BxSxKxH = (jnp.repeat(x, n // kv, axis=2) for x in (k_BxSxKxH, v_BxSxKxH))
    scores_BxNxTxS = jnp.einsum("btnh,bsnh->bnts", q_BxTxNxH, k_BxSxKxH,
                                preferred_element_type=jnp.float32) / math.sqrt(h)
    t, s = scores_BxNxTxS.shape[2:]
    mask = jnp.ones((1, 1, t, s), bool) if segment_ids_BxT is None else _segment_mask(segment_ids_BxT, causal)
    if causal:
        mask = mask & jnp.tril(jnp.ones((t, s), bool), s - t)[None, None]
    probs_BxNxTxS = jax.nn.softmax(jnp.where(mask, scores_BxNxTxS, -1e30), axis=-1)
    keep = jax.random.bernoulli(key, 1.0 - rate, probs_BxNxTxS.shape)
    probs_BxNxTxS = jnp.where(keep, probs_BxNxTxS / (1.0 - rate), 0.0).astype(v_BxSxKxH.dtype)
    return jnp.einsum("bnts,bsnh->btnh", probs_BxNxTxS, v_BxSxKxH)


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, segment_ids_BxT=None, causal: bool = True, impl: str = "auto",
           mask_BxTxS=None, dropout_rate: float = 0.0, dropout_key=None):
    """Softmax attention of T queries over S keys, grouped-query heads allowed (N a multiple of K).

    Tokens attend only within their segment (document); segment id 0 marks padding in bidirectional
    attention. `mask_BxTxS` (decoding over a KV cache) replaces the causal and segment masks. With a
    `dropout_key` and `dropout_rate` > 0 (training), the probabilities are dropped out.
    """
    if mask_BxTxS is not None:
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_BxTxS[:, None])
    if dropout_key is not None and dropout_rate > 0:
        return dropout_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, causal, dropout_rate, dropout_key)
    impl = choose_impl(impl, q_BxTxNxH.dtype, q_BxTxNxH.shape[1], causal)
    if impl == "chunked":
        if not causal:
            raise ValueError("model.attention_impl='chunked' is causal only; use 'xla' or 'auto' for an encoder.")
        return chunked_causal_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)
    if impl == "splash":
        return splash_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, causal=causal)
    if impl == "cudnn" and segment_ids_BxT is not None and cudnn_packing_available():
        return cudnn_packed_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, causal=causal)
    return _dense_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT, causal, impl)
