"""Data preparation, the tools behind tools/shard_data.py and tools/train_tokenizer.py: read, clean,
deduplicate, split and tokenize a corpus or task records. It imports the core (lmtrain.data: formats, the
shard writer); the core never imports it."""
