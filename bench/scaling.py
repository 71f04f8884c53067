"""Data-parallel scaling on CPU: samples/s at 1 and 2 ranks, plain and search iterations.

    .venv/bin/python bench/scaling.py [--model resnet8] [--batch 128] [--steps 40] [--quick]

For each setting it launches `torchrun --standalone --nproc_per_node=W bench/scaling.py --worker`
(W = 1 also runs under torchrun, so every setting pays the same launcher), and the worker times
the real pieces of the training loop: TensorSplit.batches (rank slice of each global batch),
abdist.engine.dist.wrap (DDP, gloo), AutoBalance with the coordinator's collectives.

- plain:  optimiser steps of the global batch B (each rank B/W samples).
- search: the same steps with an AutoBalance hyper step every `--hyper-interval` steps
  (scope head, CG, tune l and delta, hyper_batches 2): what a search epoch costs.
- bytes per hyper step: every Python-level torch.distributed call made inside a hyper step is
  recorded (element count x element size, per rank): the coordinator's all-reduce of the
  hypergradient plus its broadcast of alpha_sub, K floats each, whatever the model size. For
  scale, a plain DDP step all-reduces every gradient (4 bytes x parameters).

Settings: 1 rank x 1 thread, 1 rank x all cores, and W ranks x 1 thread (OMP_NUM_THREADS=1 per
rank). samples/s counts global samples (B per step); each setting is launched --repeat times and
the best figures are kept (other load on a shared machine only slows runs down). The last stdout
line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _synthetic_bundle(image_size: int, channels: int, classes: int, seed: int = 0):
    """A long-tailed (rho = 10) labelled image set, big enough that no step waits for data."""
    import torch

    from abdist.data.memory import DataBundle, TensorSplit

    g = torch.Generator().manual_seed(seed)
    counts = [int(round(600 * 10 ** (-i / (classes - 1)))) for i in range(classes)]

    def split(per_class):
        y = torch.cat([torch.full((n,), c) for c, n in enumerate(per_class)])
        x = torch.randn(len(y), channels, image_size, image_size, generator=g)
        x += 0.5 * y.float().view(-1, 1, 1, 1) / classes  # a little signal
        return TensorSplit(x, y)

    return DataBundle(
        train=split(counts),
        val=split([max(4, n // 4) for n in counts]),
        test=split([20] * classes),
        class_names=[str(c) for c in range(classes)],
        in_channels=channels,
        image_size=image_size,
    )


def worker(args) -> None:
    import torch
    import torch.distributed as tdist

    from abdist.config import load_config
    from abdist.engine.dist import init_dist, wrap
    from abdist.engine.routing import loss_through
    from abdist.losses import build_loss_spec
    from abdist.methods import Batch
    from abdist.methods.autobalance import AutoBalance
    from abdist.models import create_model

    cfg = load_config(
        None,
        [
            f"dist.backend={args.backend}",
            f"train.batch_size={args.batch}",
            "train.threads=0",
            "loss.name=la",
            "method.name=autobalance",
            "autobalance.tune=[l,delta]",
            "autobalance.scope=head",
            "autobalance.hypergrad=cg",
            "autobalance.warmup_epochs=0",
            f"autobalance.hyper_interval={args.hyper_interval}",
            "autobalance.hyper_batches=2",
            f"dist.hyper_shard={args.hyper_shard}",
            "train.epochs=1",
        ],
    )
    dist = init_dist(cfg)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    data = _synthetic_bundle(args.image_size, 3, 10)
    model = create_model(args.model, num_classes=10, in_channels=3, image_size=args.image_size)
    spec = build_loss_spec("la", data.class_counts, tau=1.0)
    method = AutoBalance(cfg, data, spec, None, dist.device, comm=dist)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
    engine = wrap(model, optimizer, dist, cfg, micro_batch=dist.local_batch(args.batch))
    method.on_epoch_start(0)

    bytes_in_hyper, in_hyper = [], [False]
    for name in ("all_reduce", "broadcast", "all_gather", "reduce", "reduce_scatter"):
        original = getattr(tdist, name)

        def recorded(*a, _original=original, **k):
            if in_hyper[0] and a and hasattr(a[0], "numel"):
                bytes_in_hyper.append(a[0].numel() * a[0].element_size())
            return _original(*a, **k)

        setattr(tdist, name, recorded)

    def run(steps: int, search: bool) -> tuple[float, float, int]:
        """Seconds for `steps` optimiser steps (the slowest rank), seconds in hyper steps, count."""
        gen = torch.Generator().manual_seed(1)
        batches = data.train.batches(args.batch, shuffle=True, generator=gen, drop_last=True,
                                     rank=dist.rank, world_size=dist.world_size)  # fmt: skip
        engine.model.train()
        dist.barrier()
        t0, hyper_s, n_hyper = time.perf_counter(), 0.0, 0
        for step in range(steps):
            try:
                x, y = next(batches)
            except StopIteration:
                gen.manual_seed(step)
                batches = data.train.batches(args.batch, shuffle=True, generator=gen,
                                             drop_last=True, rank=dist.rank,
                                             world_size=dist.world_size)  # fmt: skip
                x, y = next(batches)
            batch = Batch(x, y)
            loss = loss_through(
                engine.model, engine.module, lambda m, b=batch: method.training_loss(m, b)
            )
            engine.backward(loss)
            engine.step()
            if search and (step + 1) % args.hyper_interval == 0:
                h0 = time.perf_counter()
                in_hyper[0] = True
                method.hyper_step(engine.module, step)
                in_hyper[0] = False
                hyper_s += time.perf_counter() - h0
                n_hyper += 1
        elapsed = torch.tensor([time.perf_counter() - t0, hyper_s])
        if dist.world_size > 1:
            tdist.all_reduce(elapsed, op=tdist.ReduceOp.MAX)
        return float(elapsed[0]), float(elapsed[1]), n_hyper

    run(args.warmup, search=True)  # allocator, autograd and the CG path warmed up
    bytes_in_hyper.clear()
    plain_s, _, _ = run(args.steps, search=False)
    search_s, hyper_s, n_hyper = run(args.steps, search=True)
    if dist.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(
            "RESULT "
            + json.dumps(
                {
                    "plain_samples_per_s": args.steps * args.batch / plain_s,
                    "search_samples_per_s": args.steps * args.batch / search_s,
                    "hyper_step_ms": 1000 * hyper_s / max(1, n_hyper),
                    "bytes_per_hyper_step": sum(bytes_in_hyper) / max(1, n_hyper),
                    "grad_bytes_per_plain_step": 4 * n_params if dist.world_size > 1 else 0,
                    "params": n_params,
                    "K": sum(v.numel() for v in method.coordinator.alpha_sub.values()),
                }
            ),
            flush=True,
        )


def launch(args, ranks: int, threads: int) -> dict:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone",
        f"--nproc_per_node={ranks}", str(Path(__file__).resolve()), "--worker",
        "--threads", str(threads), "--backend", "ddp" if ranks > 1 else "none",
        "--model", args.model, "--batch", str(args.batch), "--steps", str(args.steps),
        "--warmup", str(args.warmup), "--hyper-interval", str(args.hyper_interval),
        "--image-size", str(args.image_size), "--hyper-shard", args.hyper_shard,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(REPO)}
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    lines = [x for x in r.stdout.splitlines() if x.startswith("RESULT ")]
    if r.returncode != 0 or not lines:
        sys.exit(f"worker failed ({ranks} ranks):\n{r.stdout[-2000:]}\n{r.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT ") :])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", default="resnet8")
    p.add_argument("--batch", type=int, default=128, help="global batch")
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--warmup", type=int, default=10)
    p.add_argument("--hyper-interval", type=int, default=10)
    p.add_argument("--hyper-shard", default="val", choices=("val", "train_val"))
    p.add_argument("--image-size", type=int, default=32)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--backend", default="none", help=argparse.SUPPRESS)
    p.add_argument("--repeat", type=int, default=3, help="launches per setting; best is kept")
    p.add_argument("--quick", action="store_true", help="few steps, one launch: a smoke run")
    args = p.parse_args()
    if args.worker:
        return worker(args)
    if args.quick:
        args.steps, args.warmup, args.repeat = 10, 5, 1
    cores = os.cpu_count() or 1
    settings = [("1 rank x 1 thread", 1, 1), (f"1 rank x {cores} threads", 1, cores),
                (f"{args.ranks} ranks x 1 thread", args.ranks, 1)]  # fmt: skip
    rows = {}
    for label, ranks, threads in settings:
        # Best of --repeat launches: on a shared machine, other processes only ever slow a run.
        runs = [launch(args, ranks, threads) for _ in range(args.repeat)]
        r = rows[label] = {
            **runs[0],
            "plain_samples_per_s": max(x["plain_samples_per_s"] for x in runs),
            "search_samples_per_s": max(x["search_samples_per_s"] for x in runs),
            "hyper_step_ms": min(x["hyper_step_ms"] for x in runs),
        }
        print(f"{label:>22}: plain {r['plain_samples_per_s']:7.1f} samples/s, search "
              f"{r['search_samples_per_s']:7.1f} samples/s, hyper step {r['hyper_step_ms']:6.1f} "
              f"ms, {r['bytes_per_hyper_step']:.0f} B per hyper step", flush=True)  # fmt: skip
    one, many = rows[settings[0][0]], rows[settings[2][0]]
    summary = {
        "bench": "scaling",
        "model": args.model,
        "global_batch": args.batch,
        "steps": args.steps,
        "repeat": args.repeat,
        "hyper_interval": args.hyper_interval,
        "hyper_shard": args.hyper_shard,
        "cores": cores,
        "settings": rows,
        "plain_speedup": many["plain_samples_per_s"] / one["plain_samples_per_s"],
        "search_speedup": many["search_samples_per_s"] / one["search_samples_per_s"],
        "bytes_per_hyper_step": many["bytes_per_hyper_step"],
        "grad_bytes_per_plain_step": many["grad_bytes_per_plain_step"],
        "K": many["K"],
    }
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
