"""Batched decoding with a KV cache: the model-level generation that training samples, evaluation scores,
`lmtrain generate` prints and `lmtrain serve` streams.

Decoding runs the training model's own blocks: `Transformer.hidden` takes a KV cache, which the
attention module writes in place, so a change to the block (an adapter, another norm) needs no
mirror here. Prompts of different lengths are left-padded into one batch: each row's positions start at its
first real token, and padding slots are masked out of attention. The prefill and the whole decode
loop (a lax.while_loop over a fixed-size cache) are one jitted function. Without the cache each step
runs the full forward pass over the fixed-size token buffer, which is the baseline the cache is
measured against.
"""

from __future__ import annotations

import dataclasses
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from lmtrain.model.transformer import ModelDef


class GenerationError(ValueError):
    """A generation request that cannot run; the message says what to change."""


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 64  # tokens generated per prompt (fewer when EOS comes first)
    temperature: float = 0.0  # 0 is greedy; otherwise logits are divided by it before sampling
    top_k: int = 0  # keep the k most likely tokens (0: all)
    top_p: float = 1.0  # keep the smallest set of tokens whose probability reaches p (1.0: all)
    eos_id: int | None = None  # stop a row once it emits this token (None: never stop early)
    pad_id: int = 0  # fills the left padding and the slots after a row stopped
    stop_ids: tuple[int, ...] = ()  # further tokens that stop a row (a chat model's end of turn, a --stop token)

    @property
    def ends(self) -> tuple[int, ...]:
        """Every token that ends a row."""
        return tuple(dict.fromkeys(((self.eos_id,) if self.eos_id is not None else ()) + tuple(self.stop_ids)))


def check_sampling(temperature: float, top_k: int, top_p: float, max_new_tokens: int) -> None:
    """Raise GenerationError, naming the option, for a value that would sample garbage or silently mean another."""
    if not math.isfinite(temperature) or temperature < 0:
        raise GenerationError(f"--temperature {temperature}: give 0 (greedy) or a positive number.")
    if not 0 < top_p <= 1:  # NaN fails this too
        raise GenerationError(f"--top-p {top_p}: give a probability mass above 0 and at most 1 (1: off).")
    if top_k < 0:
        raise GenerationError(f"--top-k {top_k}: give 0 (off) or a positive number of tokens.")
    if max_new_tokens < 1:
        raise GenerationError(f"--max-new-tokens {max_new_tokens}: give at least 1.")


@dataclasses.dataclass
class GenerationResult:
    tokens: list[list[int]]  # new tokens per prompt, up to and including EOS
    seconds: float  # prefill + decode, after compilation
    compile_seconds: float

    @property
    def new_tokens(self) -> int:
        return sum(len(t) for t in self.tokens)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / max(self.seconds, 1e-9)


def sample_logits(logits_BxV: jax.Array, key: jax.Array, temperature, top_k, top_p) -> jax.Array:
    """Next token per row: argmax where temperature is 0, else temperature / top-k / top-p sampling.

    The sampling values are traced (scalars, or one per row), so one compiled program serves every request:
    the server batches rows with different settings and never compiles after warm-up. `key` is one key for
    the batch or one key per row."""
    B, V = logits_BxV.shape
    temperature_B = jnp.broadcast_to(jnp.asarray(temperature, jnp.float32), (B,))
    top_k_B = jnp.broadcast_to(jnp.asarray(top_k, jnp.int32), (B,))
    top_p_B = jnp.broadcast_to(jnp.asarray(top_p, jnp.float32), (B,))
    logits_BxV = logits_BxV.astype(jnp.float32)
    greedy_B = jnp.argmax(logits_BxV, axis=-1).astype(jnp.int32)
    scaled_BxV = logits_BxV / jnp.maximum(temperature_B, 1e-6)[:, None]
    sorted_BxV = jnp.sort(scaled_BxV, axis=-1)[:, ::-1]
    rank_V = jnp.arange(V)
    # top-k: keep the tokens at least as likely as the k-th (k = 0 keeps all)
    in_top_k_BxV = (top_k_B[:, None] <= 0) | (rank_V[None, :] < top_k_B[:, None])
    sorted_BxV = jnp.where(in_top_k_BxV, sorted_BxV, -jnp.inf)
    # top-p over what top-k kept: the smallest head of the sorted tokens whose mass reaches p; the top token
    # is always kept, whatever top_p is, and p >= 1 keeps everything
    probs_BxV = jax.nn.softmax(sorted_BxV, axis=-1)
    mass_before_BxV = jnp.cumsum(probs_BxV, axis=-1) - probs_BxV
    kept_BxV = in_top_k_BxV & ((mass_before_BxV < top_p_B[:, None]) | (rank_V == 0)[None, :] | (top_p_B >= 1)[:, None])
    threshold_Bx1 = jnp.where(kept_BxV, sorted_BxV, jnp.inf).min(axis=-1, keepdims=True)
    scaled_BxV = jnp.where(scaled_BxV < threshold_Bx1, -jnp.inf, scaled_BxV)
    if key.ndim == 0:
        sampled_B = jax.random.categorical(key, scaled_BxV, axis=-1)
    else:
        sampled_B = jax.vmap(lambda k, row: jax.random.categorical(k, row))(key, scaled_BxV)
    return jnp.where(temperature_B <= 0, greedy_B, sampled_B.astype(jnp.int32))


def sampling_values(sampling: SamplingConfig) -> tuple[np.ndarray, ...]:
    """The traced arguments of a compiled generate function: temperature, top_k, top_p and the end tokens."""
    return (np.float32(sampling.temperature), np.int32(sampling.top_k), np.float32(sampling.top_p),
            np.asarray(sampling.ends, np.int32))


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """(tokens_BxP, pad_B): prompts right-aligned in one array, and how many padding slots each row has."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise GenerationError("every prompt needs at least one token.")
    width = max(len(p) for p in prompts)
    tokens_BxP = np.full((len(prompts), width), pad_id, np.int32)
    for row, p in enumerate(prompts):
        tokens_BxP[row, width - len(p):] = p
    return tokens_BxP, np.asarray([width - len(p) for p in prompts], np.int32)


def decode_mask(slot, n_new: int, pad_B, cache_len: int) -> jax.Array:
    """[B, n_new, T]: which cache slots each of the n_new tokens written at `slot` may attend to.

    Real queries see the real (non-padding) slots up to themselves; a padding query sees only
    itself, so that no softmax row is empty.
    """
    query_slots_S = slot + jnp.arange(n_new)
    key_slots_T = jnp.arange(cache_len)
    causal_SxT = key_slots_T[None, :] <= query_slots_S[:, None]
    is_real_BxT = key_slots_T[None, :] >= pad_B[:, None]
    itself_SxT = key_slots_T[None, :] == query_slots_S[:, None]
    return causal_SxT[None] & (is_real_BxT[:, None, :] | itself_SxT[None])


def _forward_with_cache(model, tokens_BxS, positions_BxS, slot, pad_B, cache):
    """Logits for S new tokens written at cache slots [slot, slot + S), and the updated cache.

    The model's own blocks run the step (Transformer.hidden with a cache): nothing of the block is
    re-implemented here."""
    k_LxBxTxKxH, v_LxBxTxKxH = cache
    mask_BxSxT = decode_mask(slot, tokens_BxS.shape[1], pad_B, k_LxBxTxKxH.shape[2])
    x_BxSxD, cache = model.hidden(tokens_BxS, positions_BxS, cache=(k_LxBxTxKxH, v_LxBxTxKxH, slot, mask_BxSxT))
    return model.apply_head(x_BxSxD), cache


def new_cache(model_def: ModelDef, batch: int, length: int) -> tuple[jax.Array, jax.Array]:
    """An empty KV cache (k, v) of `length` slots for `batch` rows."""
    cfg = model_def.cfg
    shape = (cfg.n_layers, batch, length, cfg.n_kv_heads, cfg.resolved_head_dim)
    return jnp.zeros(shape, cfg.compute_dtype), jnp.zeros(shape, cfg.compute_dtype)


def make_generate_fn(model_def: ModelDef, max_new_tokens: int, pad_id: int, use_cache: bool = True):
    """fn(params, tokens_BxP, pad_B, key, sampling_values(...)) -> (new_tokens_BxN, steps), one jitted prefill +
    decode loop. Only the shapes are compiled in; the sampling values and end tokens are traced."""
    cfg = model_def.cfg
    vocab, n_new = cfg.vocab_size, max_new_tokens

    def generate_fn(params, prompt_BxP, pad_B, key, values):
        temperature, top_k, top_p, ends_E = values
        model = model_def.bind(params)
        B, P = prompt_BxP.shape
        T = P + n_new
        slots_T = jnp.arange(T)
        positions_BxT = jnp.maximum(slots_T[None, :] - pad_B[:, None], 0)
        segments_BxT = (slots_T[None, :] >= pad_B[:, None]).astype(jnp.int32)  # 0 marks left padding
        tokens_BxT = jnp.full((B, T), pad_id, jnp.int32).at[:, :P].set(prompt_BxP)

        if use_cache:
            cache = new_cache(model_def, B, T)
            logits_BxPxV, cache = _forward_with_cache(model, prompt_BxP, positions_BxT[:, :P], 0, pad_B, cache)
            logits_BxV = logits_BxPxV[:, -1]
        else:
            cache = ()
            logits_BxV = model(tokens_BxT, positions_BxT, segments_BxT)[:, P - 1]

        def keep_going(state):
            step, _, _, _, done_B = state
            return (step < n_new) & ~jnp.all(done_B)

        def decode_step(state):
            step, tokens_BxT, cache, logits_BxV, done_B = state
            slot = P + step
            step_key = jax.random.fold_in(key, step)
            next_B = sample_logits(logits_BxV[:, :vocab], step_key, temperature, top_k, top_p)
            next_B = jnp.where(done_B, pad_id, next_B)
            tokens_BxT = jax.lax.dynamic_update_slice(tokens_BxT, next_B[:, None], (0, slot))
            done_B = done_B | jnp.any(next_B[:, None] == ends_E[None, :], axis=-1)
            if use_cache:
                position_Bx1 = jax.lax.dynamic_slice_in_dim(positions_BxT, slot, 1, axis=1)
                logits_Bx1xV, cache = _forward_with_cache(model, next_B[:, None], position_Bx1, slot, pad_B, cache)
                logits_BxV = logits_Bx1xV[:, 0]
            else:
                logits_BxTxV = model(tokens_BxT, positions_BxT, segments_BxT)
                logits_BxV = jax.lax.dynamic_index_in_dim(logits_BxTxV, slot, axis=1, keepdims=False)
            return step + 1, tokens_BxT, cache, logits_BxV, done_B

        state = (jnp.int32(0), tokens_BxT, cache, logits_BxV, jnp.zeros((B,), bool))
        steps, tokens_BxT, _, _, _ = jax.lax.while_loop(keep_going, decode_step, state)
        return tokens_BxT[:, P:], steps

    return jax.jit(generate_fn)


def pick_tokens(logits_BxV, seeds_B, step, temperature_B, top_k_B, top_p_B, n_top: int):
    """(next_B, its logprob_B, top logprobs_BxK, their ids_BxK): one sampled token per row, each row with its
    own seed (a row's key is its seed folded with the step) and its own sampling values."""
    keys_B = jax.vmap(lambda seed: jax.random.fold_in(jax.random.key(seed), step))(seeds_B)
    next_B = sample_logits(logits_BxV, keys_B, temperature_B, top_k_B, top_p_B)
    logprobs_BxV = jax.nn.log_softmax(logits_BxV.astype(jnp.float32), axis=-1)
    chosen_B = jnp.take_along_axis(logprobs_BxV, next_B[:, None], axis=-1)[:, 0]
    top_BxK, top_ids_BxK = jax.lax.top_k(logprobs_BxV, n_top)
    return next_B, chosen_B, top_BxK, top_ids_BxK


def make_step_fns(model_def: ModelDef, n_top: int = 5):
    """(prefill, decode): the decoding core one chunk or token at a time, for a server that streams and batches.

    prefill(params, cache, chunk_BxC, slot, pad_B, seeds_B, temperature_B, top_k_B, top_p_B) -> (picked, cache)
    decode(params, cache, token_B, slot, pad_B, seeds_B, step, temperature_B, top_k_B, top_p_B) -> (picked, cache)

    A prompt, left-padded to a multiple of C, is written C tokens at a time (slot 0, C, 2C...): one program
    serves every prompt length. `picked` (pick_tokens' tuple) after the last chunk is the first new token;
    decode step s writes its token at the next slot. Slots, steps, seeds and sampling values are traced, and
    the cache is donated: one program per batch size, and no copy of the cache per token. Slots a row has
    not written yet may hold another request's keys: the mask never lets a real token see them."""
    vocab = model_def.cfg.vocab_size

    def prefill(params, cache, chunk_BxC, slot, pad_B, seeds_B, temperature_B, top_k_B, top_p_B):
        model = model_def.bind(params)
        positions_BxC = jnp.maximum(slot + jnp.arange(chunk_BxC.shape[1])[None, :] - pad_B[:, None], 0)
        logits_BxCxV, cache = _forward_with_cache(model, chunk_BxC, positions_BxC, slot, pad_B, cache)
        picked = pick_tokens(logits_BxCxV[:, -1, :vocab], seeds_B, 0, temperature_B, top_k_B, top_p_B, n_top)
        return picked, cache

    def decode(params, cache, token_B, slot, pad_B, seeds_B, step, temperature_B, top_k_B, top_p_B):
        model = model_def.bind(params)
        position_Bx1 = jnp.maximum(slot - pad_B, 0)[:, None]
        logits_Bx1xV, cache = _forward_with_cache(model, token_B[:, None], position_Bx1, slot, pad_B, cache)
        picked = pick_tokens(logits_Bx1xV[:, 0, :vocab], seeds_B, step, temperature_B, top_k_B, top_p_B, n_top)
        return picked, cache

    return jax.jit(prefill, donate_argnums=(1,)), jax.jit(decode, donate_argnums=(1,))


_COMPILED: dict = {}


def _compiled(model_def: ModelDef, sampling: SamplingConfig, use_cache: bool, signature: tuple, args):
    """The compiled generate function for these shapes, and the seconds compiling took (0 when reused): the
    sampling values are arguments, so another temperature or top-p reuses the program."""
    key = (id(model_def), sampling.max_new_tokens, sampling.pad_id, use_cache, signature)
    if key in _COMPILED and _COMPILED[key][0] is model_def:
        return _COMPILED[key][1], 0.0
    start = time.perf_counter()
    fn = make_generate_fn(model_def, sampling.max_new_tokens, sampling.pad_id, use_cache)
    compiled = fn.lower(*args).compile()
    if len(_COMPILED) >= 16:
        _COMPILED.clear()
    _COMPILED[key] = (model_def, compiled)
    return compiled, time.perf_counter() - start


def generate(model_def: ModelDef, params: dict, prompts: list[list[int]], sampling: SamplingConfig,
             seed: int = 0, use_cache: bool = True) -> GenerationResult:
    """Generate for a batch of token-id prompts of any lengths; same seed, same tokens."""
    cfg = model_def.cfg
    longest = max(len(p) for p in prompts) if prompts else 0
    if longest + sampling.max_new_tokens > cfg.max_seq_len:
        raise GenerationError(
            f"the longest prompt ({longest} tokens) plus max_new_tokens={sampling.max_new_tokens} exceeds the "
            f"model's {cfg.max_seq_len} positions (model.max_seq_len). Shorten the prompt or generate fewer tokens."
        )
    if sampling.max_new_tokens < 1:
        raise GenerationError("max_new_tokens must be at least 1.")
    tokens_BxP, pad_B = left_pad(prompts, sampling.pad_id)
    args = (params, jnp.asarray(tokens_BxP), jnp.asarray(pad_B), jax.random.key(seed), sampling_values(sampling))
    leaves = jax.tree.leaves(args[:3]) + [args[4][3]]  # the end tokens' count is a shape too
    signature = tuple((x.shape, str(x.dtype), getattr(x, "sharding", None)) for x in leaves)
    compiled, compile_seconds = _compiled(model_def, sampling, use_cache, signature, args)
    start = time.perf_counter()
    new_BxN, steps = compiled(*args)
    new_BxN = np.asarray(jax.device_get(new_BxN))[:, : int(steps)]
    seconds = time.perf_counter() - start
    out = []
    for row in new_BxN.tolist():
        end = next((i for i, t in enumerate(row) if t in sampling.ends), None)
        out.append(row if end is None else row[: end + 1])
    return GenerationResult(out, seconds, compile_seconds)
