"""Profile the train step and print where device time goes, by kernel, from a Perfetto trace.

    python tools/profile_step.py --config=gpt2_small --config.data.batch_size=64 --steps=3 --top=30
    python tools/profile_step.py --config=tiny --hlo     # on CPU: XLA:CPU's thunks, each with its HLO

On GPU/TPU the kernels are read from the device tracks. On CPU there are none: XLA:CPU's thunks run on
its Eigen worker threads, and those are read instead (their sum can exceed the step's wall time, as
both cores work at once). --hlo prints, for each kernel, the shape and the ops of its fusion.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import pathlib
import re
import sys
import tempfile
import time

from lmtrain.runtime import apply_xla_defaults

apply_xla_defaults()  # the same XLA flags as `lmtrain train` and tools/benchmark.py

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from lmtrain import config as config_lib  # noqa: E402
from lmtrain.parallel.mesh import make_mesh  # noqa: E402
from lmtrain.parallel.partitioning import axis_rules, logical_to_spec  # noqa: E402
from lmtrain.train.state import create_sharded_state  # noqa: E402
from lmtrain.train.trainer import Components  # noqa: E402

# XLA:CPU's bookkeeping events on its worker threads: they enclose the thunks, so they are not counted.
_CPU_WRAPPERS = ("ThunkExecutor::Execute", "SlinkyThreadPool::Await")


def kernel_times(trace_dir: pathlib.Path) -> collections.Counter:
    """Total microseconds per event name on device tracks of the Perfetto JSON trace; on CPU, per thunk
    on XLA:CPU's Eigen worker threads."""
    files = sorted(trace_dir.rglob("*.trace.json.gz")) or sorted(trace_dir.rglob("perfetto_trace.json.gz"))
    events = json.loads(gzip.open(files[-1]).read())
    events = events["traceEvents"] if isinstance(events, dict) else events
    pid_names = {e["pid"]: e["args"].get("name", "") for e in events if e.get("ph") == "M" and e.get("name") == "process_name"}
    tid_names = {(e["pid"], e["tid"]): e["args"].get("name", "") for e in events
                 if e.get("ph") == "M" and e.get("name") == "thread_name"}
    totals = collections.Counter()
    for e in events:
        if e.get("ph") == "X" and "/device:" in pid_names.get(e.get("pid"), "") and "dur" in e:
            totals[e["name"]] += e["dur"]
    if not totals:
        for e in events:
            thread = tid_names.get((e.get("pid"), e.get("tid")), "")
            if e.get("ph") == "X" and "XLAEigen" in thread and "dur" in e and e["name"] not in _CPU_WRAPPERS:
                totals[e["name"]] += e["dur"]
    return totals


def describe_kernels(hlo_text: str, names) -> dict[str, str]:
    """For each kernel name: its HLO instruction's result shape, and the ops of the fusion it calls."""
    computations, current = {}, None
    for line in hlo_text.splitlines():
        head = re.match(r"^(?:ENTRY )?%?([\w.\-]+) ", line)
        if head and line.rstrip().endswith("{"):
            current = computations.setdefault(head.group(1), [])
        elif current is not None and "=" in line:
            current.append(line.strip())
    out = {}
    for name in names:
        for lines in computations.values():
            hit = next((x for x in lines if re.match(rf"^(?:ROOT )?%?{re.escape(name)} = ", x)), None)
            if hit is None:
                continue
            shape = hit.split(" = ", 1)[1].split(" ", 1)[0]
            called = re.search(r"calls=%?([\w.\-]+)", hit)
            ops = collections.Counter()
            for x in computations.get(called.group(1), []) if called else [hit]:
                op = re.search(r"= \S+ (\w[\w-]*)\(", x)
                if op and op.group(1) not in ("parameter", "bitcast", "constant"):
                    ops[op.group(1)] += 1
            out[name] = f"{shape[:60]}  " + " ".join(f"{k}x{v}" if v > 1 else k for k, v in ops.most_common(6))
            break
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="gpt2_small")
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--hlo", action="store_true", help="print each kernel's result shape and the ops of its fusion")
    p.add_argument("--json", default="", help="also write the per-step times and the top kernels to this file (JSON)")
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
            t0 = time.perf_counter()
            for _ in range(args.steps):
                state, m = step(state, batch)
            jax.block_until_ready(m)
            wall = time.perf_counter() - t0
        hlo = step.lower(state, batch).compile().as_text() if args.hlo else ""
    totals = kernel_times(trace_dir)
    total = sum(totals.values())
    print(f"device time per step: {total / args.steps / 1000:.2f} ms over {len(totals)} kernels; "
          f"wall time per step (profiled) {1000 * wall / args.steps:.2f} ms")
    described = describe_kernels(hlo, [n for n, _ in totals.most_common(args.top)]) if hlo else {}
    for name, us in totals.most_common(args.top):
        print(f"{100 * us / total:6.2f}%  {us / args.steps / 1000:8.3f} ms  {name[:60]:<40} {described.get(name, '')}")
    if args.json:
        summary = {"config": args.config, "steps": args.steps, "device_ms_per_step": total / args.steps / 1000,
                   "wall_ms_per_step": 1000 * wall / args.steps, "kernels": len(totals),
                   "top": [{"name": name, "ms_per_step": us / args.steps / 1000, "share": us / total}
                           for name, us in totals.most_common(args.top)]}
        pathlib.Path(args.json).write_text(json.dumps(summary, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
