"""Train a tokenizer (byte-level BPE, Unigram or WordPiece) on a corpus and save it as a Hugging Face directory.

    python tools/train_tokenizer.py --input 'data/*.jsonl' --algorithm bpe --vocab-size 32000 --output tok/
    python tools/train_tokenizer.py --builtin --vocab-size 4096 --output workdir/tokenizer   # no download

The command line of lmtrain.prep.train_tokenizer (see there, or --help).
"""

import sys

from lmtrain.prep.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
