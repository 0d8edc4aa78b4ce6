"""What the multi-host stop check costs per training step: none, a blocking all-gather every step (the
check lmtrain had before), and lmtrain's asynchronous agreement (lmtrain.train.actions.HostAgreement).

Runs N local processes joined by jax.distributed on 127.0.0.1 (CPU, gloo), each dispatching a
data-parallel step of a small MLP, and prints steps/s for each mode, interleaved, as medians.

    python tools/benchmark_stop_check.py --processes 2 --steps 60 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import time


def worker(args) -> None:
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=1"
    import jax

    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.config.update("jax_enable_preemption_service", False)
    jax.distributed.initialize(f"127.0.0.1:{args.port}", num_processes=args.processes, process_id=args.process_id)
    import jax.numpy as jnp
    import numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import NamedSharding, PartitionSpec

    from lmtrain.train.actions import HostAgreement

    mesh = jax.make_mesh((jax.device_count(), 1, 1), ("data", "fsdp", "tensor"))
    batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
    replicated = NamedSharding(mesh, PartitionSpec())
    d = args.width
    w = jax.device_put(jnp.ones((d, d), jnp.float32) * 0.01, replicated)

    def step(w, x):
        def loss(w):
            h = x
            for _ in range(4):
                h = jnp.tanh(h @ w)
            return jnp.mean(h * h)

        g = jax.grad(loss)(w)
        return w - 0.01 * g, loss(w)

    step = jax.jit(step, out_shardings=(replicated, replicated), donate_argnums=0)
    local = np.random.default_rng(args.process_id).normal(size=(args.rows, d)).astype(np.float32)
    x = jax.make_array_from_process_local_data(batch_sharding, local)
    agreement = HostAgreement(mesh, every=1)
    for _ in range(3):  # compile and warm up
        w, loss = step(w, x)
        agreement.check(0, False)
        multihost_utils.process_allgather(np.array([False]))
    jax.block_until_ready(w)
    results: dict[str, list[float]] = {"none": [], "blocking_allgather": [], "async_agreement": []}
    for _ in range(args.repeats):
        for mode in results:
            multihost_utils.sync_global_devices(f"start {mode}")
            t0 = time.perf_counter()
            for i in range(args.steps):
                w, loss = step(w, x)
                if mode == "blocking_allgather":
                    bool(np.any(multihost_utils.process_allgather(np.array([False]))))
                elif mode == "async_agreement":
                    agreement.check(i, False)
            jax.block_until_ready((w, loss))
            results[mode].append(args.steps / (time.perf_counter() - t0))
    if args.process_id == 0:
        print(json.dumps({m: statistics.median(v) for m, v in results.items()}))
    jax.distributed.shutdown()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2)
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--width", type=int, default=512)
    p.add_argument("--rows", type=int, default=256)
    p.add_argument("--process-id", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.process_id is not None:
        worker(args)
        return 0
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = [sys.executable, __file__, f"--processes={args.processes}", f"--steps={args.steps}",
            f"--repeats={args.repeats}", f"--width={args.width}", f"--rows={args.rows}", f"--port={port}"]
    procs = [subprocess.Popen([*base, f"--process-id={i}"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
             for i in range(args.processes)]
    out = procs[0].communicate()[0]
    for proc in procs[1:]:
        proc.wait()
    rates = json.loads(out.strip().splitlines()[-1])
    print(f"{args.processes} processes on CPU (gloo), MLP width {args.width}, {args.rows} rows per process; "
          f"median steps/s over {args.repeats} x {args.steps} steps:")
    for mode, rate in rates.items():
        print(f"  {mode:<20} {rate:8.1f} steps/s   {rate / rates['none']:.2f}x of no check")
    return 0


if __name__ == "__main__":
    sys.exit(main())
