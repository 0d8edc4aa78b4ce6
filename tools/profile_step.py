"""Profile the train step and print where device time goes, by kernel, from a Perfetto trace.

    python tools/profile_step.py --config=gpt2_small --config.data.batch_size=64 --steps=3 --top=30
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import sys
import tempfile

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from lmtrain import config as config_lib
from lmtrain.parallel.mesh import make_mesh
from lmtrain.parallel.partitioning import axis_rules, logical_to_spec
from lmtrain.train.state import create_sharded_state
from lmtrain.train.trainer import Components


def kernel_times(trace_dir: pathlib.Path) -> collections.Counter:
    """Total microseconds per event name on device tracks of the Perfetto JSON trace."""
    files = sorted(trace_dir.rglob("*.trace.json.gz")) or sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    events = json.loads(gzip.open(files[-1]).read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    pid_names = {e["pid"]: e["args"].get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    totals = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "/device:" in pid_names.get(e.get("pid"), "") and "dur" in e:
            totals[e["name"]] += e["dur"]
    return totals


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gpt2_small")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=30)
    args, rest = p.parse_known_args(sys.argv[1:] if argv is None else argv)
    cfg = config_lib.load_config(args.config)
    config_lib.apply_overrides(cfg, dict(r[len("--config."):].split("=", 1) for r in rest))
    mesh = make_mesh(config_lib.validate(cfg, jax.device_count()))
    rules = cfg.mesh.axis_rules
    parts = Components.from_config(cfg)
    b, length = cfg.data.batch_size, cfg.data.seq_len
    tokens = np.random.default_rng(0).integers(0, cfg.model.vocab_size, (b, length + 1), dtype=np.int32)
    batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "loss_mask": np.ones((b, length), np.float32),
             "positions": np.broadcast_to(np.arange(length, dtype=np.int32), (b, length)).copy()}
    with axis_rules(mesh, rules):
        state, shardings, _ = create_sharded_state(parts.model_def, parts.tx, 0, mesh, rules, parts.plan)
        bs = NamedSharding(mesh, PartitionSpec(logical_to_spec(("batch",), rules, mesh)[0], None))
        inner = parts.train_step
        step = jax.jit(lambda s, x: inner(s, {**x, "segment_ids": None}), in_shardings=(shardings, bs),
                       out_shardings=(shardings, None), donate_argnums=0)
        batch = jax.device_put(batch, bs)
        for _ in range(2):
            state, m = step(state, batch)
        jax.block_until_ready(m)
        trace_dir = pathlib.Path(tempfile.mkdtemp())
        with jax.profiler.trace(str(trace_dir), create_perfetto_trace=True):
            for _ in range(args.steps):
                state, m = step(state, batch)
            jax.block_until_ready(m)
    totals = kernel_times(trace_dir)
    total = sum(totals.values())
    print(f"device time per step: {total / args.steps / 1000:.2f} ms over {len(totals)} kernels")
    for name, us in totals.most_common(args.top):
        print(f"{100 * us / total:6.2f}%  {us / args.steps / 1000:8.3f} ms  {name[:110]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
