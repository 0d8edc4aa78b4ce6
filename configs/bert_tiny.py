"""A small BERT pretrained with masked language modelling on the built-in corpus (no download), then
fine-tuned for classification by configs/bert_tiny_classify.py. From the repository root:

    python tools/train_tokenizer.py --builtin --bert --vocab-size 4096 --output workdir/bert_tokenizer
    python tools/shard_data.py --builtin --tokenizer workdir/bert_tokenizer --output workdir/bert_shards
    lmtrain train --config=bert_tiny --workdir=workdir/bert_tiny

`--bert` gives a lowercased WordPiece tokenizer with [PAD] [UNK] [CLS] [SEP] [MASK]; documents end with
[SEP]. The model is BERT's architecture at CPU size; `lmtrain export` writes it as a BertForMaskedLM.
"""

from lmtrain.config import base_config

ARGS = ("runlocal", "smoke")  # what --config=bert_tiny:ARG accepts


def bert_model(c) -> None:
    """BERT's family switches (shared with the fine-tuning config): the same sizes as configs/tiny.py's decoder
    where the families allow, so the two compare at a similar parameter count."""
    m = c.model
    m.vocab_size = 4096  # WordPiece vocab trained on the built-in corpus (tools/train_tokenizer.py --bert)
    m.d_model = 128  # small enough for a CPU
    m.n_layers = 4
    m.n_heads = 4
    m.n_kv_heads = 4  # BERT has no grouped-query attention
    m.d_ff = 512  # 4 x d_model, as BERT
    m.max_seq_len = 128
    m.causal = False  # bidirectional attention: every token sees its whole segment, padding masked out
    m.pos_embedding = "learned"  # absolute position table
    m.type_vocab_size = 2  # token types (sentence A/B), as BERT; single texts use type 0
    m.embed_norm = True  # LayerNorm over word + position + type embeddings
    m.norm = "layernorm"
    m.norm_eps = 1e-12  # BERT's epsilon
    m.norm_position = "post"  # norm(x + sublayer(x)), no final norm
    m.mlp = "gelu_exact"  # erf GELU (Hugging Face hidden_act='gelu')
    m.use_bias = True  # biases on every projection and norm
    m.tie_embeddings = True  # the masked-LM head decodes through the token embedding
    m.pooling = "cls"  # classification reads the [CLS] token through the pooler (dense + tanh)
    m.dropout = 0.1  # BERT's hidden dropout


def get_config(arg: str = ""):
    c = base_config()
    bert_model(c)
    c.task.name = "mlm"  # masked language modelling
    c.task.mask_prob = 0.15  # BERT: 15% of tokens predicted (80% [MASK], 10% random, 10% unchanged)
    c.task.whole_word_mask = True  # choose whole words: every WordPiece piece of a chosen word together
    c.data.seq_len = 128
    c.data.batch_size = 16
    c.data.source = "shards"  # written by tools/shard_data.py (see the docstring)
    c.data.shards_dir = "workdir/bert_shards"
    c.data.tokenizer_dir = "workdir/bert_tokenizer"  # must have a mask token (train_tokenizer.py --bert)
    c.optimizer.lr = 1e-3  # post-norm BERT needs a gentler step than the pre-norm decoder (3e-3)
    c.optimizer.b2 = 0.999  # BERT's Adam
    c.optimizer.weight_decay = 0.01  # BERT's
    c.optimizer.warmup_steps = 60  # post-norm blocks diverge without warmup
    c.train.steps = 600
    c.train.log_every = 20
    c.train.eval_every = 200
    c.train.eval_batches = 0  # the whole validation split
    c.train.sample_tokens = 0  # an encoder does not generate
    c.checkpoint.every = 200
    if arg == "runlocal":  # already CPU-sized: a short run
        c.train.steps, c.train.eval_every, c.checkpoint.every = 50, 25, 25
        c.optimizer.warmup_steps = 10
    if arg == "smoke":  # seconds, for tests
        c.train.steps = 12
        c.train.eval_every = 6
        c.train.eval_batches = 2
        c.checkpoint.every = 6
        c.optimizer.warmup_steps = 3
    return c
