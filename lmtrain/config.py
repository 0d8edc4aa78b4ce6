"""Default configuration, config loading, command-line overrides and start-up validation.

Every experiment in `configs/` starts from `base_config()` and changes what it needs.
The returned ConfigDict is locked, so a mistyped key fails loudly.
"""

from __future__ import annotations

import ast
import difflib
import importlib.util
import json
import math
import pathlib

import ml_collections

from lmtrain.errors import ConfigError
from lmtrain.param_rules import DEFAULT_PARAM_RULES, check_lora, check_param_rules, freeze_presets
from lmtrain.tasks import task_config_defaults, validate_task_config

OPTIMIZERS = ("adamw", "adafactor", "lion", "sgd")
SCHEDULES = ("cosine", "linear", "constant", "wsd")
REMAT_POLICIES = ("none", "full", "save_dots")
ATTENTION_IMPLS = ("auto", "xla", "cudnn", "chunked", "splash")
DTYPES = ("float32", "bfloat16", "float16")

CONFIGS_DIR = pathlib.Path(__file__).resolve().parent.parent / "configs"


# Logical axis -> mesh axis (or axes). Model code names only the logical axes.
# Parameters use `embed`, `mlp`, `heads`, `kv_heads`, `head_dim`, `vocab`, `layers`;
# activations use `batch`, `length`, `act_embed`, `act_mlp`, `act_heads`, `act_kv_heads`, `act_vocab`.
DEFAULT_AXIS_RULES = (
    ("batch", ("data", "fsdp")),
    ("length", None),
    ("act_embed", None),
    ("act_mlp", "tensor"),
    ("act_heads", "tensor"),
    ("act_kv_heads", "tensor"),
    ("act_vocab", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv_heads", "tensor"),
    ("head_dim", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("lora_rank", None),
)


def base_config() -> ml_collections.ConfigDict:
    """Defaults shared by every experiment; each field says what it does."""
    c = ml_collections.ConfigDict()

    c.model = m = ml_collections.ConfigDict()
    m.vocab_size = 4096  # tokens the tokenizer emits; the embedding is padded up to vocab_pad_multiple
    m.vocab_pad_multiple = 128  # pad the embedding rows so the vocab dim shards evenly and tiles well
    m.d_model = 256  # residual stream width
    m.n_layers = 4  # transformer blocks
    m.n_heads = 4  # query heads
    m.n_kv_heads = 4  # key/value heads; fewer than n_heads gives grouped-query attention
    m.head_dim = 0  # 0 means d_model // n_heads
    m.d_ff = 1024  # hidden width of the MLP
    m.max_seq_len = 256  # positions the model has (learned table size; RoPE has no table)
    m.pos_embedding = "rope"  # 'learned' (GPT-2) or 'rope' (Llama)
    m.rope_theta = 10000.0  # RoPE base frequency
    m.rope_scaling = ()  # () or ('llama3', factor, low_freq_factor, high_freq_factor, original_max_positions)
    m.norm = "rmsnorm"  # 'layernorm' (GPT-2) or 'rmsnorm' (Llama)
    m.norm_eps = 1e-5  # epsilon inside the norms
    m.mlp = "swiglu"  # 'gelu' (GPT-2) or 'swiglu' (Llama)
    m.use_bias = False  # biases on every projection and norm (GPT-2)
    m.qkv_bias = False  # biases on q/k/v only (Qwen2)
    m.tie_embeddings = False  # share the token embedding with the output head (GPT-2)
    m.init_std = 0.02  # normal init std; output projections use init_std / sqrt(2 * n_layers)
    m.dropout = 0.0  # dropout on attention output, MLP output and embeddings (training only)
    m.attention_dropout = 0.0  # dropout on the attention probabilities (training only; BERT's recipe: 0.1)
    m.classifier_dropout = 0.0  # dropout on a classifier head's input (training only; BERT: its hidden dropout)
    m.dtype = "float32"  # compute dtype: 'float32' or 'bfloat16'
    m.param_dtype = "float32"  # storage dtype of parameters and optimizer state
    m.scan_layers = False  # lax.scan over the blocks: compile time independent of depth
    m.remat = "none"  # activation checkpointing: 'none', 'full' or 'save_dots'
    m.attention_impl = "auto"  # 'xla', 'cudnn' (flash kernel on GPU), 'chunked' (query blocks; fast on CPU) or 'auto'
    m.logits_dtype = "float32"  # dtype of the [batch, length, vocab] logits; the loss is always reduced in float32
    m.num_labels = 0  # classes of the classification head (task.name='classify'; set from the data's labels)
    m.lora_rank = 0  # LoRA: adapters of this rank on lora_targets, base frozen (0: full fine-tuning)
    m.lora_alpha = 16.0  # LoRA: the update is scaled by lora_alpha / lora_rank
    m.lora_dropout = 0.0  # LoRA: dropout on each adapter's input
    m.lora_targets = ("q", "v")  # LoRA: q, k, v, o, gate, up, down, or a family's names (q_proj, c_attn, query, ...)
    m.adapter = "lora"  # the adapter method when lora_rank > 0 (lmtrain.model.adapters.ADAPTERS; plugins add more)
    # Encoders (BERT): bidirectional attention and the BERT family's parts; see configs/bert_tiny.py.
    m.causal = True  # False: every token attends to every non-padding token of its segment (encoders)
    m.type_vocab_size = 0  # token-type (sentence A/B) embeddings, BERT: 2; 0 for none
    m.norm_position = "pre"  # 'pre' (GPT-2, Llama): x + f(norm(x)) and a final norm; 'post' (BERT): norm(x + f(x))
    m.embed_norm = False  # a norm over the summed input embeddings (BERT)
    m.pooling = "last"  # classify head: 'last' real token (decoders) or 'cls': first token through dense+tanh (BERT)
    # Encoder-decoders (T5): model.arch='t5' builds lmtrain.model.encdec from the fields above (n_layers: encoder
    # blocks; mlp: 'relu' (T5 v1.0) or 'gated-gelu' (v1.1, Flan-T5); head_dim: T5's d_kv) and these; see configs/t5_tiny.py.
    m.arch = "transformer"  # 'transformer' (GPT-2, Llama, BERT) or 't5' (encoder-decoder: tasks seq2seq, span_corruption)
    m.n_decoder_layers = 0  # T5: decoder blocks (0: as many as the encoder)
    m.relative_buckets = 32  # T5: relative position buckets per stack
    m.relative_max_distance = 128  # T5: distance beyond which positions share the last bucket
    m.scale_decoder_outputs = False  # T5 v1.0: scale the decoder output by d_model**-0.5 before the (tied) head
    m.pad_id = 0  # T5: the padding token id
    m.eos_id = 1  # T5: the end-of-sequence token id; generation stops at it
    m.decoder_start_id = 0  # T5: the token the decoder starts from (T5's pad)

    c.task = tk = ml_collections.ConfigDict()
    tk.name = "lm"  # what is trained: 'lm' (next token), 'sft' (prompt -> completion), 'classify', ... or a plugin's
    tk.update(task_config_defaults())  # each task's own keys: lmtrain/tasks/options.py says what they do

    c.data = d = ml_collections.ConfigDict()
    d.source = "builtin"  # 'builtin': text that ships with Python, no download; 'shards': tools/shard_data.py output
    d.shards_dir = ""  # directory written by tools/shard_data.py (data.source='shards')
    d.verify_shards = True  # check every shard's sha256 against the manifest at start-up (hosts split the work)
    d.seq_len = 128  # tokens per training example
    d.batch_size = 16  # global batch, in sequences, summed over all hosts
    # classify and ner (one example per row): rows only as long as the batch needs, one of at most this many
    # lengths up to seq_len (one compiled step each), examples grouped by length; 0 pads every row to seq_len.
    # Text (lm, mlm) and sft rows are packed full already.
    d.length_buckets = 16
    d.val_fraction = 0.05  # share of documents held out for validation (builtin source)
    d.max_docs = 0  # cap on builtin documents, 0 for all
    d.tokenizer_dir = ""  # existing tokenizer directory; empty trains one into WORKDIR/tokenizer
    d.seed = 0  # shuffle seed of the training data
    # k-fold cross-validation (lmtrain sweep's cv_folds sets these per fold): a stable hash of each training
    # example picks its fold; fold cv_fold is the validation set and the other k - 1 folds train. The data's
    # own validation split is then unused; a test split stays the test split.
    d.cv_folds = 0  # k >= 2 folds, or 0 for no cross-validation
    d.cv_fold = 0  # the held-out fold, 0 .. cv_folds - 1

    c.optimizer = o = ml_collections.ConfigDict()
    o.name = "adamw"  # 'adamw', 'adafactor', 'lion' or 'sgd' (with momentum)
    o.lr = 3e-4  # peak learning rate
    o.b1 = 0.9  # Adam/Lion first-moment decay
    o.b2 = 0.95  # Adam/Lion second-moment decay
    o.eps = 1e-8  # Adam epsilon
    o.momentum = 0.9  # SGD momentum
    o.weight_decay = 0.1  # decoupled weight decay
    # Parameter rules: (regex over the parameter path, label). Labels: 'train', 'freeze', 'decay',
    # 'no_decay', 'lr=X' (learning-rate multiplier). Later rules override earlier ones for the same
    # property; every rule must match at least one parameter. Paths look like 'blocks/attn/wq', 'embed'.
    o.param_rules = DEFAULT_PARAM_RULES
    # Presets that add rules before param_rules: '' (none), 'embeddings' (freeze the token and position
    # embeddings), 'blocks:N' (freeze the first N blocks), 'all_but_head' (train only the head: a linear
    # probe for classify). Several can be joined with '+', e.g. 'embeddings+blocks:4'.
    o.freeze = ""
    o.clip_norm = 1.0  # global-norm gradient clipping, 0 to disable
    o.schedule = "cosine"  # 'cosine', 'linear', 'constant' or 'wsd' (warmup-stable-decay)
    o.warmup_steps = 100  # linear warmup to lr; step 1 already takes lr / warmup_steps
    o.min_lr_ratio = 0.1  # final lr as a fraction of lr (cosine, linear, wsd)
    o.wsd_decay_fraction = 0.2  # wsd: share of the steps spent in the final decay

    c.train = t = ml_collections.ConfigDict()
    t.steps = 1000  # optimizer steps
    t.grad_accum = 1  # micro-batches per step; batch_size must divide by it
    t.z_loss = 0.0  # weight of the z-loss (log Z)^2 that keeps the softmax normaliser near 1
    t.seed = 0  # parameter init and dropout seed
    t.init_from = ""  # parameters to start from when WORKDIR has no checkpoint: an `lmtrain import` output or a WORKDIR
    t.init_from_which = "latest"  # when init_from is a WORKDIR: its 'latest' or 'best' checkpoint, or a step number
    t.log_every = 10  # steps between metric logs
    t.eval_every = 200  # steps between validation runs (0 disables)
    t.eval_batches = 8  # validation batches per evaluation (0 means the whole split)
    t.sample_tokens = 48  # tokens to sample from the model at the end (0 disables)
    t.sample_prompt = "The "  # prompt for the final sample
    t.preemption_check_every = 1  # steps between multi-host checks for a stop signal (asynchronous: no stall)
    t.early_stopping = es = ml_collections.ConfigDict()
    es.metric = "val_loss"  # metric that picks the best checkpoint and drives early stopping
    es.mode = ""  # 'min' or 'max'; empty takes the task's own direction for the metric
    es.patience = 0  # evaluations without improvement before stopping; 0 never stops early
    es.min_delta = 0.0  # an improvement smaller than this does not count

    c.checkpoint = k = ml_collections.ConfigDict()
    k.every = 200  # steps between checkpoints (the final step is always saved)
    k.keep = 2  # latest checkpoints kept; the best by train.early_stopping.metric is kept as well
    k.async_save = True  # save in the background while training continues
    k.checksums = True  # hash every checkpoint file after a save; a damaged checkpoint is skipped on resume

    c.mesh = mm = ml_collections.ConfigDict()
    mm.data = -1  # data-parallel size; -1 takes the devices the other axes leave
    mm.fsdp = 1  # parameter/optimizer-state sharding (ZeRO-3) size
    mm.tensor = 1  # Megatron tensor-parallel size over heads and MLP
    mm.dcn_data = -1  # data-parallel groups across TPU slices (DCN); -1: one per slice present (1 off multi-slice)
    mm.axis_rules = DEFAULT_AXIS_RULES  # logical axis -> mesh axes

    c.logging = lg = ml_collections.ConfigDict()
    lg.tensorboard = True  # write TensorBoard event files under WORKDIR/tensorboard
    lg.progress_bar = True  # console progress bar; off: one plain line per log_every steps
    lg.loss_curve_png = True  # draw WORKDIR/loss_curve.png at the end
    return c


def shrink_to_cpu(c: ml_collections.ConfigDict, d_ff: int = 512, n_kv_heads: int = 4) -> ml_collections.ConfigDict:
    """The `runlocal` switch: keep the config's family switches, shrink it to a 50-step fp32 CPU run
    on the built-in corpus."""
    m = c.model
    m.vocab_size, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.d_ff = 4096, 128, 2, 4, n_kv_heads, d_ff
    m.max_seq_len, m.dtype, m.logits_dtype = 128, "float32", "float32"
    c.data.source, c.data.seq_len, c.data.batch_size, c.train.grad_accum = "builtin", 128, 8, 1
    c.optimizer.warmup_steps, c.train.steps, c.train.eval_every, c.checkpoint.every = 10, 50, 25, 25
    return c


def _as_tuples(value):
    return tuple(_as_tuples(v) for v in value) if isinstance(value, list | tuple) else value


def config_from_dict(values: dict, source: str = "dict") -> ml_collections.ConfigDict:
    """A locked config: the defaults updated with `values` (as written by `to_json`). Unknown keys are errors."""
    cfg = base_config()

    def merge(node, update, prefix):
        for key, value in update.items():
            dotted = f"{prefix}{key}"
            if key not in node:
                raise ConfigError(f"{source}: unknown config key 'config.{dotted}'.")
            if isinstance(node[key], ml_collections.ConfigDict):
                merge(node[key], value, dotted + ".")
            elif isinstance(node[key], tuple):
                node[key] = _as_tuples(value)
            else:
                node[key] = value

    merge(cfg, values, "")
    cfg.lock()
    return cfg


def parse_overrides(parser, rest: list[str]) -> dict[str, str]:
    """{'optimizer.lr': '1e-3', ...} from the --config.KEY=VALUE arguments argparse left over; anything else is a
    usage error through `parser` (exit status 2, no traceback)."""
    overrides = {}
    for item in rest:
        if not item.startswith("--config."):
            parser.error(f"unrecognised argument {item!r}; config overrides look like --config.optimizer.lr=1e-3")
        key, sep, value = item[len("--config."):].partition("=")
        if not sep:
            parser.error(f"override {item!r} has no value; write --config.{key}=VALUE")
        overrides[key] = value
    return overrides


def load_config(spec: str) -> ml_collections.ConfigDict:
    """Load `NAME`, `NAME:ARG`, `path/to/config.py`, `path.py:ARG` or a resolved `config.json`; return it locked."""
    name, _, arg = spec.partition(":")
    path = pathlib.Path(name)
    if path.suffix == ".json":
        if not path.is_file():
            raise ConfigError(f"config '{spec}': no file {path}.")
        try:
            values = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ConfigError(f"config file {path}: not valid JSON ({e}).") from None
        return config_from_dict(values, str(path))
    if not path.suffix:
        path = CONFIGS_DIR / f"{name}.py"
    if not path.is_file():
        known = sorted(p.stem for p in CONFIGS_DIR.glob("*.py") if not p.stem.startswith("_"))
        raise ConfigError(f"config '{spec}': no file {path}. Known configs: {', '.join(known)}.")
    module_spec = importlib.util.spec_from_file_location(f"lmtrain_config_{path.stem}", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path} has no get_config() function.")
    config_arg(arg, tuple(getattr(module, "ARGS", ())), name)  # a config lists the ARGs it understands
    cfg = module.get_config(arg) if arg else module.get_config()
    cfg.lock()
    return cfg


def _parse_value(raw: str, current):
    if isinstance(current, bool):
        low = raw.lower()
        if low in ("true", "1", "yes"):
            return True
        if low in ("false", "0", "no"):
            return False
        raise ValueError(f"expected true or false, got {raw!r}")
    if isinstance(current, int):
        return int(float(raw)) if "e" in raw.lower() else int(raw)
    if isinstance(current, float):
        return float(raw)
    if isinstance(current, str):
        return raw
    return ast.literal_eval(raw)


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: dict[str, str]) -> None:
    """Apply `{'optimizer.lr': '1e-3'}` style overrides; an unknown key is an error naming it."""
    for dotted, raw in overrides.items():
        *parents, leaf = dotted.split(".")
        node = cfg
        for i, part in enumerate(parents):
            if part not in node or not isinstance(node[part], ml_collections.ConfigDict):
                _unknown_key(".".join(parents[: i + 1]), node, part)
            node = node[part]
        if leaf not in node:
            _unknown_key(dotted, node, leaf)
        try:
            value = _parse_value(raw, node[leaf])
        except (ValueError, SyntaxError) as e:
            raise ConfigError(f"--config.{dotted}={raw}: cannot parse as {type(node[leaf]).__name__} ({e}).") from None
        with cfg.unlocked():
            node[leaf] = value


def _unknown_key(dotted: str, node: ml_collections.ConfigDict, part: str) -> None:
    close = difflib.get_close_matches(part, list(node.keys()), n=3)
    hint = f" Did you mean: {', '.join(close)}?" if close else f" Valid keys here: {', '.join(sorted(node.keys()))}."
    raise ConfigError(f"unknown config key 'config.{dotted}'.{hint}")


def resolve_mesh_shape(mesh_cfg, n_devices: int) -> tuple[int, int, int]:
    """Sizes of (data, fsdp, tensor); at most one -1, which takes the remaining devices."""
    sizes = [mesh_cfg.data, mesh_cfg.fsdp, mesh_cfg.tensor]
    names = ["data", "fsdp", "tensor"]
    if sizes.count(-1) > 1:
        raise ConfigError("mesh: only one of mesh.data, mesh.fsdp, mesh.tensor may be -1.")
    for name, size in zip(names, sizes):
        if size == 0 or size < -1:
            raise ConfigError(f"mesh.{name}={size}: a mesh axis size must be positive or -1.")
    fixed = 1
    for s in sizes:
        if s != -1:
            fixed *= s
    if -1 in sizes:
        if n_devices % fixed:
            raise ConfigError(
                f"mesh: the fixed axes ({' x '.join(f'{n}={s}' for n, s in zip(names, sizes) if s != -1)}) "
                f"do not divide the {n_devices} devices present."
            )
        sizes[sizes.index(-1)] = n_devices // fixed
    total = sizes[0] * sizes[1] * sizes[2]
    if total > n_devices:
        raise ConfigError(
            f"mesh: data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} needs {total} devices, "
            f"but only {n_devices} are present. Lower mesh.* or set one axis to -1."
        )
    if total < n_devices:
        raise ConfigError(
            f"mesh: data={sizes[0]} x fsdp={sizes[1]} x tensor={sizes[2]} uses {total} of {n_devices} devices. "
            "Set one axis to -1 to use them all."
        )
    return tuple(sizes)


def validate(cfg: ml_collections.ConfigDict, n_devices: int) -> tuple[int, int, int]:
    """Check the config against itself and the devices; return the resolved mesh shape."""
    m, d, o, t = cfg.model, cfg.data, cfg.optimizer, cfg.train
    _check_ranges(cfg)
    data, fsdp, tensor = resolve_mesh_shape(cfg.mesh, n_devices)
    batch_shards = data * fsdp
    if d.batch_size % batch_shards:
        raise ConfigError(
            f"data.batch_size={d.batch_size} is not divisible by the data-parallel size "
            f"mesh.data x mesh.fsdp = {batch_shards}. Use a multiple of {batch_shards}."
        )
    if t.grad_accum < 1 or d.batch_size % t.grad_accum or (d.batch_size // t.grad_accum) % batch_shards:
        raise ConfigError(
            f"train.grad_accum={t.grad_accum}: data.batch_size={d.batch_size} must split into grad_accum "
            f"micro-batches that are each divisible by the data-parallel size {batch_shards}."
        )
    if m.n_heads % m.n_kv_heads:
        raise ConfigError(
            f"model.n_heads={m.n_heads} is not divisible by model.n_kv_heads={m.n_kv_heads} "
            "(n_heads % n_kv_heads != 0); grouped-query attention needs whole groups."
        )
    if m.n_heads % tensor:
        raise ConfigError(f"model.n_heads={m.n_heads} is not divisible by the tensor-parallel size mesh.tensor={tensor}.")
    if m.n_kv_heads % tensor:
        raise ConfigError(
            f"model.n_kv_heads={m.n_kv_heads} is not divisible by the tensor-parallel size mesh.tensor={tensor}."
        )
    if m.d_ff % tensor:
        raise ConfigError(f"model.d_ff={m.d_ff} is not divisible by the tensor-parallel size mesh.tensor={tensor}.")
    if m.d_model % fsdp:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by the FSDP size mesh.fsdp={fsdp}.")
    if not m.head_dim and m.d_model % m.n_heads:
        raise ConfigError(f"model.d_model={m.d_model} is not divisible by model.n_heads={m.n_heads}; set model.head_dim.")
    if d.seq_len > m.max_seq_len:
        raise ConfigError(
            f"data.seq_len={d.seq_len} is larger than the model's positions model.max_seq_len={m.max_seq_len}."
        )
    if o.name not in OPTIMIZERS:
        raise ConfigError(f"optimizer.name='{o.name}' is unknown. Choose one of: {', '.join(OPTIMIZERS)}.")
    if o.schedule not in SCHEDULES:
        raise ConfigError(f"optimizer.schedule='{o.schedule}' is unknown. Choose one of: {', '.join(SCHEDULES)}.")
    choices = {
        "model.pos_embedding": (m.pos_embedding, ("learned", "rope")),
        "model.norm": (m.norm, ("layernorm", "rmsnorm")),
        "model.arch": (m.arch, ("transformer", "t5")),
        "model.mlp": (m.mlp, ("relu", "gated-gelu") if m.arch == "t5" else ("gelu", "gelu_exact", "swiglu")),
        "model.norm_position": (m.norm_position, ("pre", "post")),
        "model.pooling": (m.pooling, ("last", "cls")),
        "model.remat": (m.remat, REMAT_POLICIES),
        "model.attention_impl": (m.attention_impl, ATTENTION_IMPLS),
        "model.dtype": (m.dtype, DTYPES),
        "model.param_dtype": (m.param_dtype, DTYPES),
        "model.logits_dtype": (m.logits_dtype, DTYPES),
    }
    for key, (value, allowed) in choices.items():
        if value not in allowed:
            raise ConfigError(f"{key}='{value}' is unknown. Choose one of: {', '.join(allowed)}.")
    if not m.causal and m.attention_impl == "chunked":
        raise ConfigError("model.attention_impl='chunked' is causal only, and model.causal=False (an encoder); use "
                          "'auto' or 'xla'.")
    if t.steps < 1:
        raise ConfigError(f"train.steps={t.steps} must be at least 1.")
    if o.warmup_steps > t.steps:
        raise ConfigError(f"optimizer.warmup_steps={o.warmup_steps} is longer than train.steps={t.steps}.")
    if cfg.checkpoint.every < 1:
        raise ConfigError(f"checkpoint.every={cfg.checkpoint.every} must be at least 1.")
    return data, fsdp, tensor


_POSITIVE = (
    "model.vocab_size", "model.d_model", "model.n_layers", "model.n_heads", "model.n_kv_heads", "model.d_ff",
    "model.max_seq_len", "data.seq_len", "data.batch_size", "train.steps", "train.grad_accum", "train.log_every",
    "train.preemption_check_every", "checkpoint.every", "checkpoint.keep", "model.relative_buckets",
    "model.relative_max_distance",
)
_NON_NEGATIVE = (
    "model.head_dim", "model.num_labels", "model.type_vocab_size", "data.max_docs", "optimizer.weight_decay",
    "optimizer.clip_norm", "model.n_decoder_layers", "model.pad_id", "model.eos_id", "model.decoder_start_id",
    "optimizer.warmup_steps", "optimizer.eps", "train.eval_every", "train.eval_batches", "train.sample_tokens",
    "train.z_loss", "train.early_stopping.patience", "train.early_stopping.min_delta",
)


def _get(cfg, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def _float_fields(node, prefix: str = ""):
    """(dotted key, value) of every float in the config."""
    for key, value in node.items():
        if isinstance(value, ml_collections.ConfigDict | dict):
            yield from _float_fields(value, f"{prefix}{key}.")
        elif isinstance(value, float):
            yield f"{prefix}{key}", value


def _check_ranges(cfg) -> None:
    """Each numeric field in its range, each name a known choice; the message names the key."""
    for key, value in _float_fields(cfg):  # an inf or NaN lr, eps, decay, ... only ever trains NaNs
        if not math.isfinite(value):
            raise ConfigError(f"{key}={value} is not a finite number; give a finite value.")
    for key in _POSITIVE:
        if _get(cfg, key) < 1:
            raise ConfigError(f"{key}={_get(cfg, key)} must be at least 1.")
    for key in _NON_NEGATIVE:
        if _get(cfg, key) < 0:
            raise ConfigError(f"{key}={_get(cfg, key)} must not be negative.")
    o, m = cfg.optimizer, cfg.model
    if not o.lr > 0:
        raise ConfigError(f"optimizer.lr={o.lr} must be positive (a peak learning rate such as 3e-4).")
    for key in ("b1", "b2", "momentum"):
        if not 0.0 <= o[key] < 1.0:
            raise ConfigError(f"optimizer.{key}={o[key]} must lie in [0, 1).")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optimizer.min_lr_ratio={o.min_lr_ratio} must lie in [0, 1].")
    if not 0.0 < o.wsd_decay_fraction <= 1.0:
        raise ConfigError(f"optimizer.wsd_decay_fraction={o.wsd_decay_fraction} must lie in (0, 1].")
    for key in ("dropout", "attention_dropout", "classifier_dropout"):
        if not 0.0 <= m.get(key, 0.0) < 1.0:
            raise ConfigError(f"model.{key}={m[key]} must lie in [0, 1).")
    check_lora(m)
    freeze_presets(o.freeze, m.n_layers)
    if cfg.data.cv_folds == 1 or cfg.data.cv_folds < 0:
        raise ConfigError(f"data.cv_folds={cfg.data.cv_folds}: use 0 (no cross-validation) or k >= 2 folds.")
    if cfg.data.cv_folds and not 0 <= cfg.data.cv_fold < cfg.data.cv_folds:
        raise ConfigError(f"data.cv_fold={cfg.data.cv_fold} is not one of the {cfg.data.cv_folds} folds "
                          f"(0 to {cfg.data.cv_folds - 1}).")
    if cfg.train.early_stopping.mode not in ("", "min", "max"):
        raise ConfigError(f"train.early_stopping.mode='{cfg.train.early_stopping.mode}' must be 'min', 'max' or "
                          "empty (the task's own direction for the metric).")
    check_param_rules(o.param_rules)
    validate_task_config(cfg)  # a known task (a plugin's after lmtrain.plugins.load_plugins) and its keys


def config_arg(arg: str, allowed: tuple[str, ...], name: str) -> str:
    """Check the ARG of `--config=NAME:ARG` against what `get_config` understands."""
    if arg and arg not in allowed:
        choices = ", ".join(allowed) if allowed else "none"
        raise ConfigError(f"config '{name}:{arg}': unknown argument '{arg}'. Arguments this config takes: {choices}.")
    return arg


def to_json(cfg: ml_collections.ConfigDict) -> str:
    return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)
