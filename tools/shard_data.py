"""Clean, tokenize and write a corpus as ArrayRecord token shards with a manifest, for lmtrain's loader.

    python tools/shard_data.py --input 'data/*.jsonl' --tokenizer tok/ --output shards/
    python tools/shard_data.py --builtin --tokenizer workdir/tokenizer --output workdir/shards   # no download

The command line of lmtrain.prep.shard_data (see there, or --help); a plugin's format (LMTRAIN_PLUGINS) is a
choice of --format.
"""

import sys

from lmtrain.prep.shard_data import main

if __name__ == "__main__":
    sys.exit(main())
