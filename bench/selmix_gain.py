"""SelMix gain matrix: wall time and peak memory of one gain computation at K classes.

    .venv/bin/python bench/selmix_gain.py [--quick] [--threads 2]

For K = 10, 100, 1,000 and 8,142 (iNaturalist-2018; --quick stops at 1,000) and feature sizes
d = 64 and 512: random prototypes Z [K, d], a linear head (W, b) scaled like a trained one
(logits of a few units), the min-recall objective's logit gradient D from a random confusion
matrix, then `abdist.methods.selmix_gain.gains` -- what one SelMix refresh computes after its
validation pass. Each (K, d) runs in its own child process (peak memory = VmHWM above the level
at the start of the call, see bench/peak_memory.py), timed as the median of 3 calls after a
warm-up (one call for K = 8,142).

Cross-check for K <= 50: the public code's formulation, re-implemented (`gains_k4`, the explicit
K^4 logit-change tensor, published=True) against ours: the largest difference relative to the
largest gain (it differs by design: <z_i, z_q> where the derivation gives <m_ij, z_q>, and no bias
term), and the exact K^4 form of the derivation (published=False), which must agree to rounding.

The last stdout line is one JSON object; ``seconds_k1000`` is K = 1,000 at d = 512.
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

from abdist.methods.selmix_gain import gains, gains_k4, logit_gradient  # noqa: E402
from abdist.methods.selmix_objectives import Objective  # noqa: E402

LAM_BAR = 0.8  # lambda_min = 0.6


def problem(k: int, d: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    Z = torch.randn(k, d, generator=g).relu()  # post-ReLU features, like a ResNet's
    W = torch.randn(k, d, generator=g) * (3.0 / d**0.5)
    b = torch.randn(k, generator=g) * 0.1
    rows = torch.softmax(torch.randn(k, k, generator=g) + 3 * torch.eye(k), 1)
    C = rows / k
    D = logit_gradient(Objective("min_recall").grad(C), C)
    return Z, W, b, D


def child(k: int, d: int, threads: int) -> dict:
    torch.set_num_threads(threads)
    Z, W, b, D = problem(k, d)
    run = lambda: gains(Z, W, b, D, lam_bar=LAM_BAR)  # noqa: E731
    rounds = 1 if k > 4000 else 3
    if rounds > 1:
        run()  # warm-up
    times = []
    peak = 0.0
    for _ in range(rounds):
        t0 = time.perf_counter()
        peak = max(peak, peak_rss_mb(run))
        times.append(time.perf_counter() - t0)
    out = {"k": k, "d": d, "seconds": round(statistics.median(times), 4), "peak_mb": round(peak, 1)}
    if k <= 50:
        Z64, W64, b64, D64 = (t.double() for t in (Z, W, b, D))
        ours = gains(Z64, W64, b64, D64, lam_bar=LAM_BAR)
        scale = float(ours.abs().max())
        exact = gains_k4(Z64, W64, b64, D64, lam_bar=LAM_BAR)
        published = gains_k4(Z64, W64, b64, D64, lam_bar=LAM_BAR, published=True)
        out["k4_exact_rel_diff"] = float((exact - ours).abs().max()) / scale
        out["k4_published_rel_diff"] = float((published - ours).abs().max()) / scale
        top = lambda G: set(torch.topk(G.flatten(), 10).indices.tolist())  # noqa: E731
        out["k4_published_top10_overlap"] = len(top(published) & top(ours)) / 10
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="K up to 1,000 (under a minute)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--child", nargs=2, type=int, metavar=("K", "D"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child, args.threads)))
        return
    ks = [10, 50, 100, 1000] + ([] if args.quick else [8142])
    results = []
    for k in ks:
        for d in (64, 512):
            cmd = [sys.executable, __file__, "--child", str(k), str(d), "--threads",
                   str(args.threads)]  # fmt: skip
            proc = subprocess.run(cmd, env={**os.environ, **CHILD_ENV}, capture_output=True,
                                  text=True)  # fmt: skip
            if proc.returncode != 0:
                sys.exit(f"K={k} d={d} failed:\n{proc.stderr[-2000:]}")
            row = json.loads(proc.stdout.strip().splitlines()[-1])
            print(f"K={k:5d} d={d:4d}  {row['seconds']:9.4f} s  peak {row['peak_mb']:8.1f} MB",
                  file=sys.stderr, flush=True)  # fmt: skip
            results.append(row)
    by = {(r["k"], r["d"]): r for r in results}
    summary = {
        "bench": "selmix_gain",
        "quick": args.quick,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "seconds_k1000": by[(1000, 512)]["seconds"],
        "peak_mb_k1000": by[(1000, 512)]["peak_mb"],
        "rows": results,
    }
    if (8142, 512) in by:
        summary["seconds_k8142"] = by[(8142, 512)]["seconds"]
        summary["peak_mb_k8142"] = by[(8142, 512)]["peak_mb"]
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
