"""Attention kernels behind one call, `attend`: XLA's fused attention, cuDNN flash attention (GPU),
and query-chunked causal attention (fast on CPU); causal or bidirectional, with document masking.

Model code calls `attend` and never picks a kernel itself; `attention_impl='auto'` chooses by backend.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

ATTENTION_CHUNK = 256
IMPLEMENTATIONS = ("auto", "xla", "cudnn", "chunked")


def choose_impl(requested: str, dtype, length: int, causal: bool) -> str:
    """'auto' picks cuDNN flash attention on GPU (bf16/fp16), query-chunked causal attention for long
    sequences on CPU, and XLA's fused attention otherwise."""
    if requested != "auto":
        return requested
    backend = jax.default_backend()
    if backend == "gpu" and dtype in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    if causal and backend == "cpu" and length >= 2 * ATTENTION_CHUNK and length % ATTENTION_CHUNK == 0:
        return "chunked"
    return "xla"


def chunked_causal_attention(q_BxTxNxH, k_BxTxKxH, v_BxTxKxH, segment_ids_BxT=None, chunk: int = ATTENTION_CHUNK):
    """Causal attention computed one block of `chunk` queries at a time against only the keys at or
    before the block: half the FLOPs of the full masked product and a [chunk, T] score tile instead
    of [T, T]. Same result as jax.nn.dot_product_attention(is_causal=True) with the segment mask."""
    b, t, n, h = q_BxTxNxH.shape
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


def attend(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, *, segment_ids_BxT=None, causal: bool = True, impl: str = "auto",
           mask_BxTxS=None):
    """Softmax attention of T queries over S keys, grouped-query heads allowed (N a multiple of K).

    Tokens attend only within their segment (document); segment id 0 marks padding in bidirectional
    attention. `mask_BxTxS` (decoding over a KV cache) replaces the causal and segment masks.
    """
    if mask_BxTxS is not None:
        return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_BxTxS[:, None])
    impl = choose_impl(impl, q_BxTxNxH.dtype, q_BxTxNxH.shape[1], causal)
    if impl == "chunked":
        if not causal:
            raise ValueError("model.attention_impl='chunked' is causal only; use 'xla' or 'auto' for an encoder.")
        return chunked_causal_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, segment_ids_BxT)
    mask_Bx1xTxS = None
    if segment_ids_BxT is not None:
        mask_Bx1xTxS = segment_ids_BxT[:, None, :, None] == segment_ids_BxT[:, None, None, :]
        if not causal:
            # Padding (segment 0) keys are never attended to; a padding query still sees the other
            # padding slots so that its softmax row is not empty (its output is never used).
            mask_Bx1xTxS = mask_Bx1xTxS & ((segment_ids_BxT[:, None, None, :] > 0) | (segment_ids_BxT[:, None, :, None] == 0))
    return jax.nn.dot_product_attention(q_BxTxNxH, k_BxSxKxH, v_BxSxKxH, mask=mask_Bx1xTxS, is_causal=causal,
                                        implementation=impl)
