"""AutoBalance hyper-step overhead: a search-phase iteration over a plain CE iteration.

    .venv/bin/python bench/hyperstep.py [--quick] [--interval 20] [--threads 2]

Same model (ResNet-32, batch 128, SGD momentum 0.9, weight decay 5e-4) and the same data for
every variant: synthetic CIFAR10-LT-sized tensors in memory (3x32x32, 10 classes, exp profile
rho = 100: train n_c = floor(5000 mu^c) = 12406 images, val floor(1000 mu^c) = 2478; speed only,
the labels carry no signal). Everything is built from the real pieces: `load_config` overrides,
a `DataBundle` of `TensorSplit`s, `create_model`, `AutoBalance(cfg, data, spec, augment, device)`
with `build_loss_spec("la", counts)`, and `ERM(ParametricLoss(build_loss_spec("ce", ...)))` for
the plain baseline.

Timed (warm-up round first, medians over rounds, the variants interleaved within each round):

* ``plain_ce``: ERM CE `training_loss` + backward + `optimizer.step()` (+ zero_grad);
* ``search_step``: the same with AutoBalance's LA-initialised parametric loss;
* ``hyper_head`` / ``hyper_full``: `AutoBalance.after_step` at a step where it fires, i.e. one
  `hyper_step`, at scope head / full with the solver settings printed at start-up.

A search-phase iteration costs ``search_step + hyper / k`` (one hyper step every k =
``autobalance.hyper_interval`` steps); ``ratio_<scope>`` divides that by ``plain_ce``. Batches are
drawn from the in-memory split before timing (no augmentation in any variant: the loader is
benchmarked separately). The model is trained by the timed steps themselves, so the hyper steps
see a (lightly) trained network, not the initialisation.

Peak memory (CPU): a child process with ``MALLOC_MMAP_THRESHOLD_=65536`` (large blocks are
mmapped and returned on free, so the resident set follows live memory) resets the kernel's
high-water mark (/proc/self/clear_refs) before one plain step and before one hyper step of each
scope and reports VmHWM minus VmRSS at the start. GPU: torch.cuda.max_memory_allocated.

Also reported: the solver's relative residual and CG iterations per hyper step, a breakdown of
the hypergradient into its passes (validation gradient, building the gradient graph, one
Hessian-vector product), and for the head scope the residual and hypergradient direction of
CG at several iteration counts against the exact solve. The last stdout line is one JSON object
with all figures and settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402
from peak_memory import CHILD_ENV, peak_rss_mb  # noqa: E402

import abdist.methods.autobalance_hyper as ab_module  # noqa: E402
from abdist.bilevel.hypergrad import OutputLoss  # noqa: E402
from abdist.config import load_config  # noqa: E402
from abdist.data.augment import build_train_augment  # noqa: E402
from abdist.data.memory import DataBundle, TensorSplit  # noqa: E402
from abdist.engine.optim import build_optimizer  # noqa: E402
from abdist.losses import ParametricLoss, build_loss_spec  # noqa: E402
from abdist.methods import Batch  # noqa: E402
from abdist.methods.autobalance import AutoBalance  # noqa: E402
from abdist.methods.erm import ERM  # noqa: E402
from abdist.models import create_model  # noqa: E402

NUM_CLASSES = 10
SCOPES = ("head", "full")
# Timed next to the scopes: the head scope with the shipped CIFAR10-LT tune, the per-class
# probability and magnitude of the class-aware chain included (aug_mag moves the input, so the
# hypergradient's mixed term runs the chain and the backbone back to the magnitude).
AUG_VARIANT = "head_aug"
AUG_OPS = "[rotate,translate,brightness,contrast,cutout]"
VARIANTS = (*SCOPES, AUG_VARIANT)


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# --- data ---------------------------------------------------------------------------------------


def lt_counts(n_max: int, rho: float, classes: int = NUM_CLASSES) -> list[int]:
    """Exp long-tail profile: n_c = floor(n_max * rho^(-c / (C - 1)))."""
    return [int(n_max * rho ** (-c / (classes - 1))) for c in range(classes)]


def synthetic_split(counts: list[int], gen: torch.Generator) -> TensorSplit:
    labels = torch.cat([torch.full((n,), c, dtype=torch.int64) for c, n in enumerate(counts)])
    labels = labels[torch.randperm(len(labels), generator=gen)]
    images = torch.randn(len(labels), 3, 32, 32, generator=gen)
    return TensorSplit(images, labels)


def build_bundle(rho: float) -> DataBundle:
    gen = torch.Generator().manual_seed(0)
    return DataBundle(
        train=synthetic_split(lt_counts(5000, rho), gen),
        val=synthetic_split(lt_counts(1000, rho), gen),
        test=synthetic_split([10] * NUM_CLASSES, gen),
        class_names=[str(c) for c in range(NUM_CLASSES)],
        in_channels=3,
        image_size=32,
    )


# --- set-up -------------------------------------------------------------------------------------


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def make_config(args, variant: str):
    """The Config of one variant, through the real override parser and validator."""
    scope = "head" if variant == AUG_VARIANT else variant
    aug = [f"data.augment_ops={AUG_OPS}", "autobalance.tune=[w,l,delta,aug,aug_mag]"]
    solver = {
        "hypergrad": getattr(args, f"{scope}_solver"),
        "solver_iterations": getattr(args, f"{scope}_iters"),
        "damping": getattr(args, f"{scope}_damping"),
        "hyper_batches": getattr(args, f"{scope}_batches"),
        "curvature": getattr(args, f"{scope}_curvature"),
    }
    return load_config(
        None,
        [
            "model.name=resnet32",
            "loss.name=la",
            "method.name=autobalance",
            f"autobalance.scope={scope}",
            f"autobalance.hyper_interval={args.interval}",
            "autobalance.warmup_epochs=0",
            f"train.batch_size={args.batch_size}",
            f"train.threads={args.threads}",
            "train.device=cpu" if args.device == "cpu" else "train.device=auto",
            "optim.name=sgd",
            "optim.lr=0.05",
            "optim.momentum=0.9",
            "optim.weight_decay=5e-4",
            *(f"method.{k}={v}" for k, v in solver.items()),
            *(aug if variant == AUG_VARIANT else []),
        ],
    )


class HypergradSpy:
    """Wraps `hypergradient` as AutoBalance calls it: keeps the call, its info and wall time."""

    def __init__(self, device):
        self.real = ab_module.hypergradient
        self.device = device
        self.last_info: dict = {}
        self.last_s = 0.0
        self.last_call = None

    def __call__(self, train_loss, val_loss, params, alpha, **kw):
        self.last_call = (train_loss, val_loss, params, alpha, kw)
        sync(self.device)
        t0 = time.perf_counter()
        out = self.real(train_loss, val_loss, params, alpha, **kw)
        sync(self.device)
        self.last_s = time.perf_counter() - t0
        self.last_info = out[1]
        return out


class Bench:
    """One model, one optimiser, the CE baseline and one AutoBalance method per scope."""

    def __init__(self, args):
        self.args = args
        torch.manual_seed(0)
        torch.set_num_threads(args.threads)
        self.cfgs = {s: make_config(args, s) for s in VARIANTS}
        cfg = self.cfg = self.cfgs["head"]
        want_cuda = args.device == "auto" and torch.cuda.is_available()
        self.device = device = torch.device("cuda" if want_cuda else "cpu")
        self.data = data = build_bundle(args.rho)
        counts = data.class_counts
        model = create_model(cfg.model.name, data.num_classes, data.in_channels, data.image_size)
        self.model = model.to(device).train()
        self.optimizer = build_optimizer(self.model.parameters(), cfg.optim)
        self.erm = ERM(ParametricLoss(build_loss_spec("ce", counts)).to(device))
        spec = build_loss_spec("la", counts, tau=cfg.loss.tau)
        augment = build_train_augment(
            self.cfgs[AUG_VARIANT].data, data.num_classes, ((0.0,) * 3, (1.0,) * 3), seed=0
        )
        self.methods = {
            s: AutoBalance(c, data, spec, augment if s == AUG_VARIANT else None, device)
            for s, c in self.cfgs.items()
        }
        for m in self.methods.values():
            m.on_epoch_start(cfg.autobalance.warmup_epochs)  # the search phase: hyper steps are on
        self.spy = HypergradSpy(device)
        ab_module.hypergradient = self.spy  # the hyper step looks the name up at call time
        gen = torch.Generator().manual_seed(1)
        B = cfg.train.batch_size
        self.pool = [
            (x.to(device), y.to(device))
            for x, y in data.train.batches(B, shuffle=True, generator=gen, drop_last=True)
        ]
        self.cursor = 0
        self.hyper_calls = 0

    def settings(self) -> dict:
        cfg = self.cfg
        out = {
            "model": cfg.model.name,
            "batch_size": cfg.train.batch_size,
            "optim": "sgd lr 0.05 momentum 0.9 wd 5e-4",
            "interval_k": cfg.autobalance.hyper_interval,
            "threads": torch.get_num_threads(),
            "device": str(self.device),
            "train_size": len(self.data.train),
            "val_size": len(self.data.val),
            "counts": self.data.class_counts,
            "loss_init": "la",
            "tune": list(cfg.autobalance.tune),
            "objective": cfg.autobalance.objective,
            "upper": f"{cfg.autobalance.upper_optim} lr {cfg.autobalance.upper_lr}",
        }
        for s, c in self.cfgs.items():
            m = c.autobalance
            out[f"{s}_solver"] = {
                "hypergrad": m.hypergrad,
                "iterations": m.solver_iterations,
                "damping": m.damping,
                "curvature": m.curvature,
                "hyper_batches": m.hyper_batches,
                "weight_decay_in_H": c.optim.weight_decay,
            }
        return out

    def plain_step(self, method) -> float:
        x, y = self.pool[self.cursor % len(self.pool)]
        self.cursor += 1
        sync(self.device)
        t0 = time.perf_counter()
        loss = method.training_loss(self.model, Batch(x, y))
        loss.backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        sync(self.device)
        return time.perf_counter() - t0

    def hyper(self, scope: str) -> dict:
        k = self.cfg.autobalance.hyper_interval
        self.hyper_calls += 1
        step = k * self.hyper_calls - 1  # a step at which after_step fires
        sync(self.device)
        t0 = time.perf_counter()
        out = self.methods[scope].after_step(step, self.model)
        sync(self.device)
        wall = time.perf_counter() - t0
        if "solver_residual" not in out:
            raise RuntimeError("after_step did not run a hyper step")
        info = self.spy.last_info
        return {
            "s": wall,
            "hypergradient_s": self.spy.last_s,
            "residual": out["solver_residual"],
            "iterations": info.get("iterations"),
            "hvp_calls": info.get("hvp_calls"),
            "negative_curvature": bool(info.get("negative_curvature", False)),
        }


# --- memory -------------------------------------------------------------------------------------


def memory_child(args) -> None:
    """Run in a child process (see `memory_probe`): peak memory of one plain and hyper step."""
    bench = Bench(args)
    method = bench.methods["head"]
    for _ in range(2):
        bench.plain_step(method)
    out = {"plain_step_peak_mb": round(peak_rss_mb(lambda: bench.plain_step(method)), 1)}
    for scope in SCOPES:
        if not args.quick:
            bench.hyper(scope)  # warm: one-time caches are not the step's memory
        out[f"hyper_{scope}_peak_mb"] = round(peak_rss_mb(lambda s=scope: bench.hyper(s)), 1)
    print(json.dumps(out))


def memory_probe(args, argv: list[str]) -> dict:
    if args.device != "cpu" and torch.cuda.is_available():
        return {}
    env = dict(os.environ, **CHILD_ENV)
    cmd = [sys.executable, str(Path(__file__).resolve()), *argv, "--memory-child"]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        log(proc.stderr[-2000:])
        return {"memory_probe_error": proc.returncode}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), "memory_method": "VmHWM child"}


def cuda_peaks(bench: Bench) -> dict:
    dev = bench.device
    out = {}
    for name, fn in [
        ("plain_step_peak_mb", lambda: bench.plain_step(bench.methods["head"])),
        *((f"hyper_{s}_peak_mb", lambda s=s: bench.hyper(s)) for s in SCOPES),
    ]:
        torch.cuda.reset_peak_memory_stats(dev)
        base = torch.cuda.memory_allocated(dev)
        fn()
        out[name] = round((torch.cuda.max_memory_allocated(dev) - base) / 2**20, 1)
    return {**out, "memory_method": "torch.cuda.max_memory_allocated"}


# --- where the time goes ------------------------------------------------------------------------


def _timed_ms(fn, device, repeats: int) -> float:
    out = []
    for _ in range(repeats):
        sync(device)
        t0 = time.perf_counter()
        fn()
        sync(device)
        out.append(time.perf_counter() - t0)
    return round(1e3 * statistics.median(out), 2)


def breakdown(bench: Bench, repeats: int, forward_mode: bool) -> dict:
    """Time the passes one hypergradient call is made of, on the closures of the last call
    (model in eval mode, as `hyper_step` has it)."""
    train_loss, val_loss, params, alpha, _ = bench.spy.last_call
    names = list(params)
    sizes = [params[k].numel() for k in names]
    shapes = [params[k].shape for k in names]
    theta = torch.cat([params[k].reshape(-1) for k in names])

    def unflat(t):
        return {k: c.view(s) for k, c, s in zip(names, t.split(sizes), shapes)}

    def f_train(t, a):
        return train_loss(unflat(t), a)

    def f_val(t, a):
        return val_loss(unflat(t), a)

    def timed(fn):
        return _timed_ms(fn, bench.device, repeats)

    grad_train = torch.func.grad(f_train, argnums=0)
    u = torch.randn_like(theta)
    bench.model.eval()
    try:
        with torch.no_grad():
            res = {
                "plain_step_ms": None,
                "train_forward_ms": timed(lambda: f_train(theta, alpha)),
                "val_grad_ms": timed(lambda: torch.func.grad(f_val, argnums=(0, 1))(theta, alpha)),
                "build_grad_graph_ms": timed(lambda: torch.func.vjp(grad_train, theta, alpha)),
            }
            _, vjp_fn = torch.func.vjp(grad_train, theta, alpha)
            res["hvp_reverse_ms"] = timed(lambda: vjp_fn(u))
            if isinstance(train_loss, OutputLoss):  # one Gauss-Newton product: J u, then Jᵀ(·)
                z, vjp_out = torch.func.vjp(lambda t: train_loss.outputs(unflat(t)), theta)
                res["gauss_newton_product_ms"] = timed(lambda: vjp_out(
                    torch.func.jvp(lambda t: train_loss.outputs(unflat(t)), (theta,), (u,))[1]
                ))  # fmt: skip
            if forward_mode:
                res["hvp_forward_ms"] = timed(
                    lambda: torch.func.jvp(lambda t: grad_train(t, alpha), (theta,), (u,))
                )
    finally:
        bench.model.train()
    method = bench.methods["head"]
    res["plain_step_ms"] = round(1e3 * statistics.median(
        bench.plain_step(method) for _ in range(max(repeats, 3))), 2)  # fmt: skip
    res["num_params"] = theta.numel()
    return res


def _flat(tree) -> torch.Tensor:
    if isinstance(tree, torch.Tensor):
        return tree.reshape(-1)
    return torch.cat([tree[k].reshape(-1) for k in sorted(tree)])


def solver_sweep(bench: Bench, variants: list[dict], reference: dict | None) -> list[dict]:
    """Re-solve the last hyper step's system with other solver settings: residual, time, and
    the cosine between each hypergradient and the one of `reference` (e.g. the exact solve)."""
    train_loss, val_loss, params, alpha, kw = bench.spy.last_call
    real = bench.spy.real

    def run(v):
        sync(bench.device)
        t0 = time.perf_counter()
        g, info = real(train_loss, val_loss, params, alpha, **{**kw, **v})
        sync(bench.device)
        return _flat(g), info, time.perf_counter() - t0

    bench.model.eval()
    try:
        ref = run(reference)[0] if reference is not None else None
        out = []
        for v in variants:
            g, info, s = run(v)
            row = {
                **v,
                "ms": round(1e3 * s, 1),
                "iterations": info.get("iterations"),
                "residual": float(f"{info['residual']:.3g}"),
                "negative_curvature": bool(info.get("negative_curvature", False)),
            }
            if ref is not None:
                cos = torch.nn.functional.cosine_similarity(g, ref, dim=0)
                row["cosine_to_reference"] = round(float(cos), 4)
            out.append(row)
        return out
    finally:
        bench.model.train()


# --- main ---------------------------------------------------------------------------------------


def parse(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats (< 1 minute when idle)")
    p.add_argument("--repeats", type=int, default=None, help="timed rounds (hyper steps/scope)")
    p.add_argument("--plain-per-round", type=int, default=None, help="plain steps per round")
    p.add_argument("--interval", type=int, default=20, help="k: a hyper step every k steps")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rho", type=float, default=100.0)
    p.add_argument("--device", choices=("cpu", "auto"), default="cpu")
    p.add_argument("--head-solver", default="cg")
    p.add_argument("--head-iters", type=int, default=20)
    p.add_argument("--head-damping", type=float, default=0.0)
    p.add_argument("--head-batches", type=int, default=2)
    p.add_argument("--head-curvature", default="auto", help="auto = the Hessian at head scope")
    p.add_argument("--full-solver", default="cg")
    p.add_argument("--full-iters", type=int, default=5)
    p.add_argument("--full-damping", type=float, default=1.0)
    p.add_argument("--full-batches", type=int, default=1)
    p.add_argument(
        "--full-curvature", default="auto", help="auto = Gauss-Newton at full scope; or hessian"
    )
    p.add_argument(
        "--full-damping-sweep",
        default="",
        help="comma-separated dampings to re-solve the last full-scope system with (slow)",
    )
    p.add_argument("--no-extras", action="store_true", help="skip breakdown, sweeps, memory")
    p.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main() -> None:
    argv = sys.argv[1:]
    args = parse(argv)
    if args.memory_child:
        memory_child(args)
        return
    repeats = args.repeats or (2 if args.quick else 8)
    per_round = args.plain_per_round or (4 if args.quick else 8)

    t_all = time.perf_counter()
    load_before = os.getloadavg()
    bench = Bench(args)
    settings = {**bench.settings(), "repeats": repeats, "plain_steps_per_round": per_round}
    log(f"settings: {json.dumps(settings)}")
    samples: dict[str, list] = {"plain_ce": [], "search_step": [], **{v: [] for v in VARIANTS}}
    rounds: list[dict] = []  # per round: median plain / search step and the two hyper steps
    for r in range(1 + repeats):
        timed = r > 0  # round 0 is the warm-up
        n0 = len(samples["plain_ce"])
        for _ in range(per_round if timed else 2):
            t = bench.plain_step(bench.erm)
            if timed:
                samples["plain_ce"].append(t)
            t = bench.plain_step(bench.methods["head"])
            if timed:
                samples["search_step"].append(t)
        for scope in VARIANTS if r % 2 == 0 else VARIANTS[::-1]:
            h = bench.hyper(scope)
            if timed:
                samples[scope].append(h)
        if timed:
            rounds.append(
                {
                    "plain": statistics.median(samples["plain_ce"][n0:]),
                    "search": statistics.median(samples["search_step"][n0:]),
                    **{s: samples[s][-1]["s"] for s in VARIANTS},
                }
            )
            log(
                f"round {r}/{repeats}: plain {1e3 * samples['plain_ce'][-1]:.0f} ms, "
                + ", ".join(f"hyper {s} {1e3 * samples[s][-1]['s']:.0f} ms" for s in VARIANTS)
            )
        else:
            log("warm-up round done")

    med = statistics.median
    plain_ms = 1e3 * med(samples["plain_ce"])
    search_ms = 1e3 * med(samples["search_step"])
    k = args.interval
    dev = bench.device
    result = {
        "benchmark": "autobalance_hyperstep",
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores, torch {torch.__version__}"
        + (f", {torch.cuda.get_device_name(dev)}" if dev.type == "cuda" else ", no GPU"),
        "plain_ce_ms": round(plain_ms, 2),
        "plain_ce_ms_quartiles": [
            round(1e3 * q, 1) for q in statistics.quantiles(samples["plain_ce"], n=4)
        ],
        "search_step_ms": round(search_ms, 2),
    }
    for scope in VARIANTS:
        hs = samples[scope]
        h_ms = 1e3 * med([h["s"] for h in hs])
        it_ms = search_ms + h_ms / k
        result[f"hyper_{scope}_ms"] = round(h_ms, 1)
        result[f"hyper_{scope}_ms_all"] = [round(1e3 * h["s"]) for h in hs]
        result[f"hyper_{scope}_hypergradient_ms"] = round(
            1e3 * med([h["hypergradient_s"] for h in hs]), 1
        )
        result[f"hyper_{scope}_over_plain"] = round(h_ms / plain_ms, 2)
        result[f"search_iter_{scope}_ms"] = round(it_ms, 2)
        result[f"ratio_{scope}"] = round(it_ms / plain_ms, 3)
        result[f"{scope}_residual_median"] = float(f"{med([h['residual'] for h in hs]):.3g}")
        result[f"{scope}_residual_max"] = float(f"{max(h['residual'] for h in hs):.3g}")
        result[f"{scope}_cg_iterations"] = sorted({h["iterations"] for h in hs})
        result[f"{scope}_hvp_calls"] = sorted({h["hvp_calls"] for h in hs})
        result[f"{scope}_negative_curvature_count"] = sum(h["negative_curvature"] for h in hs)
    # On a shared machine the load changes between rounds; a ratio formed within each round
    # (whose steps ran back to back) and then taken the median of is the robust figure.
    for scope in VARIANTS:
        per = [(q["search"] + q[scope] / k) / q["plain"] for q in rounds]
        result[f"ratio_{scope}_global_medians"] = result[f"ratio_{scope}"]
        result[f"ratio_{scope}"] = round(statistics.median(per), 3)
        result[f"ratio_{scope}_per_round"] = [round(x, 3) for x in per]
        result[f"hyper_{scope}_over_plain_per_round_median"] = round(
            statistics.median(q[scope] / q["plain"] for q in rounds), 2
        )
    result["timed_s"] = round(time.perf_counter() - t_all, 1)
    load_after = os.getloadavg()

    if not args.no_extras:
        # The full-scope pass breakdown costs ~15 s of --quick's one minute: full runs only.
        if not args.quick:
            bench.hyper("full")  # leaves spy.last_call on the full scope's closures
            bd = result["breakdown_full"] = breakdown(bench, 3, True)
            # If CG ran all its iterations (no negative-curvature exit): the validation
            # gradient, the gradient graph, `iterations` HVPs + 1 for the true residual + 1 for
            # the mixed term.
            # (Only a question for the true Hessian: Gauss-Newton is PSD, so CG always completes.)
            if bench.spy.last_call[-1].get("curvature") == "hessian":
                full_iters = bench.cfgs["full"].autobalance.solver_iterations
                worst = (
                    bd["val_grad_ms"]
                    + bd["build_grad_graph_ms"]
                    + (full_iters + 2) * bd["hvp_reverse_ms"]
                )
                result["hyper_full_ms_if_cg_completes_est"] = round(worst, 1)
                p_ms = bd["plain_step_ms"]  # timed next to the passes, not in the (noisier) rounds
                result["ratio_full_if_cg_completes_est"] = round(1 + worst / k / p_ms, 3)
            if args.full_damping_sweep:
                variants = [
                    {"method": "cg", "iterations": args.full_iters, "damping": float(d)}
                    for d in args.full_damping_sweep.split(",")
                ]
                result["full_damping_sweep"] = solver_sweep(bench, variants, None)
        bench.hyper("head")
        result["breakdown_head"] = breakdown(bench, 3, True)
        variants = [{"method": "cg", "iterations": n} for n in (5, 20, 50, 100, 200)]
        variants.append({"method": "exact"})
        result["head_solver_sweep"] = solver_sweep(bench, variants, {"method": "exact"})
        if dev.type == "cuda":
            result.update(cuda_peaks(bench))
        else:
            result.update(memory_probe(args, argv))
    result["loadavg_1_5_15_before"] = [round(v, 2) for v in load_before]
    result["loadavg_1_5_15_after_timing"] = [round(v, 2) for v in load_after]
    result["total_s"] = round(time.perf_counter() - t_all, 1)
    result["goals"] = {"ratio_head_max": 1.3, "ratio_full_max": 4.0}
    result["goals_met"] = {
        s: result[f"ratio_{s}"] <= result["goals"][f"ratio_{s}_max"] for s in SCOPES
    }
    result["settings"] = settings
    for key in ("plain_ce_ms", "search_step_ms"):
        log(f"{key:>30}: {result[key]}")
    for scope in SCOPES:
        for key in (
            "hyper_{}_ms",
            "hyper_{}_over_plain",
            "search_iter_{}_ms",
            "ratio_{}",
            "hyper_{}_peak_mb",
            "{}_residual_median",
            "{}_cg_iterations",
        ):
            key = key.format(scope)
            log(f"{key:>30}: {result.get(key)}")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
