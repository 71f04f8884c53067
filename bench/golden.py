"""Golden outputs for refactors: record a fixed set of runs, change code, record again, compare.

    python bench/golden.py record DIR          # about 4 minutes on 2 CPU cores
    python bench/golden.py compare DIR_A DIR_B # byte-identical metrics.json / alpha.json, and
                                               # log.jsonl less its "seconds"; exit 1 otherwise

The runs: digits-LT CE, LA, LDAM-DRW and AutoBalance (tune=[w,l,delta,aug]); AutoBalance with
per (group, class) cells on digits shards with two groups (without the class-aware chain, so it
compares with records made before the chain existed); LA streamed from those shards with 2
loader workers; LA on small CIFAR-style RGB shards (JPEG and PNG, generated) with 4-pixel shift
and flip, in memory and streamed with 2 workers; a 2-rank DDP AutoBalance run under torchrun
(gloo). Everything is seeded and runs
on this machine's kernels, so compare only records made on the same machine. Prints one final
JSON line.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CFG = REPO / "configs" / "digits_lt"
QUIET = ["tracking.progress=never", "train.threads=1"]
SHORT = ["train.epochs=4", "method.warmup_epochs=1"]


def _runs(shards: Path, rgb: Path) -> dict[str, list[str]]:
    on_shards = ["data.source=shards", f"data.root={shards}"]
    on_rgb = ["data.source=shards", f"data.root={rgb}", "data.augment_pad=4",
              "data.augment_flip=true", "train.epochs=3", "train.many_shot_min=40",
              "train.few_shot_max=10"]  # fmt: skip
    return {
        "ce": [str(CFG / "ce.yaml")],
        "la": [str(CFG / "la.yaml")],
        "ldam_drw": [str(CFG / "ce.yaml"), "loss.name=ldam_drw", "loss.drw_epoch=2",
                     "model.head=cosine"],
        "autobalance": [str(CFG / "autobalance.yaml"), *SHORT, "method.tune=[w,l,delta,aug]",
                        "data.augment_pad=1"],
        "per_group": [str(CFG / "autobalance.yaml"), *SHORT, *on_shards, "method.per_group=true",
                      "method.tune=[w,l]", "method.objective=equal_opportunity_gap",
                      "train.positive_class=3", "data.augment_ops=[]"],
        "streamed": [str(CFG / "la.yaml"), "train.epochs=3", *on_shards, "data.in_memory=false",
                     "data.workers=2"],
        "rgb_memory": [str(CFG / "la.yaml"), *on_rgb],
        "rgb_streamed": [str(CFG / "la.yaml"), *on_rgb, "data.in_memory=false", "data.workers=2"],
    }  # fmt: skip


def _rgb_tree(root: Path) -> None:
    """A small long-tailed RGB image tree (train 80/40/20/10 per class, test 20 each; every
    third image a PNG), the same bytes on every call: CIFAR's shape at 16x16."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, counts in (("train", (80, 40, 20, 10)), ("test", (20,) * 4)):
        for c, n in enumerate(counts):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            tint = np.array([(c * 60) % 256, 255 - c * 50, 40 + c * 40])
            for k in range(n):
                noise = rng.integers(0, 120, (16, 16, 3))
                im = Image.fromarray(((noise + tint) % 256).astype(np.uint8))
                if k % 3 == 2:
                    im.save(d / f"{k:03d}.png")
                else:
                    im.save(d / f"{k:03d}.jpg", quality=90)


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}


def _check(r: subprocess.CompletedProcess, name: str) -> None:
    if r.returncode != 0:
        sys.exit(f"golden: {name} failed (exit {r.returncode}): {r.stderr.strip()[-500:]}")


def record(out: Path) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    shards = out / "shards"
    if not shards.is_dir():
        csv = out / "groups.csv"
        csv.write_text("".join(f"{i},{'ab'[i % 2]}\n" for i in range(1797)))  # sklearn's digits
        cmd = [sys.executable, "-m", "abdist", "prepare", "digits", str(shards),
               "--imbalance-ratio", "10", "--groups", str(csv), "--shard-size", "200"]  # fmt: skip
        _check(subprocess.run(cmd, env=_env(), capture_output=True, text=True), "prepare")
    rgb = out / "rgb_shards"
    if not rgb.is_dir():
        _rgb_tree(out / "rgb_tree")
        cmd = [sys.executable, "-m", "abdist", "prepare", str(out / "rgb_tree"), str(rgb),
               "--val", "0.2", "--seed", "0", "--shard-size", "60"]  # fmt: skip
        _check(subprocess.run(cmd, env=_env(), capture_output=True, text=True), "prepare rgb")
    seconds = {}
    for name, args in _runs(shards, rgb).items():
        t0 = time.perf_counter()
        cmd = [sys.executable, "-m", "abdist", "train", args[0], "--out", str(out / name),
               *args[1:], *QUIET]  # fmt: skip
        _check(subprocess.run(cmd, env=_env(), capture_output=True, text=True), name)
        seconds[name] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "abdist", "train", str(CFG / "autobalance.yaml"), "--out", str(out / "ddp"),
           *SHORT, "dist.backend=ddp", "train.batch_size=32", *QUIET]  # fmt: skip
    _check(subprocess.run(cmd, env=_env(), capture_output=True, text=True), "ddp")
    seconds["ddp"] = round(time.perf_counter() - t0, 1)
    return {"recorded": str(out), "seconds": seconds}


def _outputs(run: Path) -> dict[str, bytes]:
    files = {}
    for p in sorted(run.rglob("*")):
        rel = str(p.relative_to(run))
        if p.name in ("metrics.json", "alpha.json"):
            files[rel] = p.read_bytes()
        elif p.name == "log.jsonl":  # wall time is the one field that may differ
            files[rel] = re.sub(rb'"seconds": [0-9.e+-]+', b'"seconds": _', p.read_bytes())
    return files


def compare(a: Path, b: Path) -> dict:
    skip = {"shards", "rgb_shards", "rgb_tree"}
    names = sorted(p.name for p in a.iterdir() if p.is_dir() and p.name not in skip)
    differ, compared = [], 0
    for name in names:
        fa, fb = _outputs(a / name), _outputs(b / name)
        if fa.keys() != fb.keys():
            differ.append(f"{name}: files {sorted(fa.keys() ^ fb.keys())}")
        for rel in sorted(fa.keys() & fb.keys()):
            compared += 1
            if fa[rel] != fb[rel]:
                differ.append(f"{name}/{rel}")
    return {"compared_files": compared, "runs": names, "differ": differ, "identical": not differ}


def main(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "record":
        result = record(Path(argv[1]))
    elif len(argv) == 3 and argv[0] == "compare":
        result = compare(Path(argv[1]), Path(argv[2]))
    else:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    print(json.dumps(result))
    return 0 if result.get("identical", True) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
