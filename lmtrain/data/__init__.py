"""Where the training data comes from: corpora, tokenizers, packing and the batch iterators."""
