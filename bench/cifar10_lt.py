"""CE, LA and AutoBalance on CIFAR10-LT (rho = 100), side by side, the same epoch budget each.

    .venv/bin/python bench/cifar10_lt.py [--epochs 30] [--model resnet8] [--seeds 0,1]
    .venv/bin/python bench/cifar10_lt.py --methods selmix_min_recall,selmix_gmean \
        [--selmix-epochs 10]

Builds CIFAR10-LT from ../shared/data/cifar10-jpeg (the CIFAR-10 JPEGs; extracted once into
--work), prepares shards with `abdist prepare` (exp profile, rho = 100, 80/20 long-tailed
train/val split of the LT pool), trains each method with configs/cifar10_lt/*.yaml at a CPU budget
(cosine schedule, `--epochs` epochs; AutoBalance: search for `--epochs` then retrain for
`--epochs`), and also scores the CE model with post-hoc logit adjustment (argmax z - tau*log pi),
the baseline a learned loss must beat as well. The last stdout line is JSON.

`selmix_<objective>` (e.g. selmix_min_recall, selmix_gmean): SelMix fine-tunes, for
`--selmix-epochs`, an LA model trained for `--epochs` on the train split only (`la_train`:
the shipped LA config with train.merge_val=false, so validation stays held out; trained once per
seed and shared by the objectives). Reported for the base and each fine-tune: mean recall
(1 - balanced error), min, G-mean and H-mean of the recalls on test, and the fine-tune's wall
time over the base training's.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def extract(data: Path, work: Path) -> Path:
    folder = work / "cifar10-jpeg"
    if not (folder / ".complete").exists():
        folder.mkdir(parents=True, exist_ok=True)
        for name in ("train.tar.gz", "test.tar.gz"):
            with tarfile.open(data / name) as tar:
                tar.extractall(folder, filter="data")
        (folder / ".complete").touch()
    return folder


def abdist(*args) -> None:
    subprocess.run([sys.executable, "-m", "abdist", *map(str, args)], check=True, cwd=REPO)


def posthoc_la(run_dir: Path, tau: float = 1.0) -> float:
    """Balanced error of the run's final model with logits - tau*log(pi) at test time."""
    import torch

    from abdist.config import load_config
    from abdist.data import build_data
    from abdist.engine.checkpoint import CheckpointDir
    from abdist.metrics import ConfusionAccumulator, class_metrics
    from abdist.models import create_model

    cfg = load_config(run_dir / "config.yaml")
    data = build_data(cfg.data).with_val_merged()
    model = create_model(cfg.model.name, data.num_classes, data.in_channels, data.image_size,
                         cfg.model.head)  # fmt: skip
    model.load_state_dict(CheckpointDir(run_dir / "checkpoints").load_latest()["model"])
    model.eval()
    prior = torch.tensor(data.class_counts, dtype=torch.float32)
    shift = tau * torch.log(prior / prior.sum())
    acc = ConfusionAccumulator(data.num_classes)
    with torch.no_grad():
        for x, y in data.test.batches(1000, shuffle=False):
            acc.update((model(x) - shift).argmax(1), y)
    return class_metrics(acc.confusion)["balanced_error"]


def _recall_figures(run: Path) -> dict[str, float]:
    """Test recall figures of a finished run, in %."""
    m = json.loads((run / "metrics.json").read_text())
    figures = {
        "mean": 1 - m["balanced_error"],
        "min": m["worst_class_recall"],
        "gmean": m["gmean_recall"],
        "hmean": m["hmean_recall"],
    }
    return {k: round(100 * v, 2) for k, v in figures.items()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", type=Path, default=REPO.parent / "shared/data/cifar10-jpeg")
    p.add_argument("--work", type=Path, default=Path("/tmp/abdist-bench"))
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--model", default="resnet8")
    p.add_argument("--seeds", default="0")
    p.add_argument("--methods", default="ce,la,autobalance")
    p.add_argument("--selmix-epochs", type=int, default=10, help="selmix_*: fine-tune epochs")
    p.add_argument("--quick", action="store_true", help="1 epoch, to check the pipeline")
    p.add_argument("--extra", nargs="*", default=[], help="more section.key=value overrides")
    p.add_argument("--tag", default="", help="suffix of the run directories (a variant's runs)")
    args = p.parse_args()
    if not (args.data / "train.tar.gz").is_file():
        sys.exit(f"bench/cifar10_lt.py: no CIFAR-10 JPEGs at {args.data} (pass --data)")
    epochs = 1 if args.quick else args.epochs
    folder = extract(args.data, args.work)
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    results: dict[str, list] = {m: [] for m in methods}
    results["ce_posthoc_la"] = []
    wall: dict[str, float] = {}
    selmix_rows: dict[str, list[dict]] = {}  # run -> per seed {mean, min, gmean, hmean} recall
    based: set[int] = set()
    for seed in seeds:
        shards = args.work / f"cifar10_lt_s{seed}"
        if not (shards / "manifest.json").exists():
            abdist("prepare", folder, shards, "--imbalance-ratio", 100, "--val", 0.2,
                   "--seed", seed, "--force")  # fmt: skip
        for m in methods:
            out = args.work / "runs" / f"{m}_{args.model}_e{epochs}_s{seed}{args.tag}"
            over = [
                f"data.root={shards}",
                f"model.name={args.model}",
                f"train.epochs={epochs}",
                f"train.seed={seed}",
                "optim.schedule=cosine",
                f"optim.warmup_epochs={min(5, epochs)}",
                "train.threads=2",
                "tracking.progress=never",
                f"loss.drw_epoch={int(0.8 * epochs)}",
                *args.extra,
            ]
            if m.startswith("selmix_"):
                base = args.work / "runs" / f"la_train_{args.model}_e{epochs}_s{seed}{args.tag}"
                if not (base / "metrics.json").exists():
                    t0 = time.perf_counter()
                    abdist("train", REPO / "configs/cifar10_lt/la.yaml", "--out", base, *over,
                           "train.merge_val=false")  # fmt: skip
                    wall[f"la_train_s{seed}"] = round(time.perf_counter() - t0, 1)
                fine = [
                    f"data.root={shards}",
                    f"model.name={args.model}",
                    f"model.init_from={base}",
                    f"selmix.objective={m[len('selmix_') :]}",
                    f"train.epochs={1 if args.quick else args.selmix_epochs}",
                    f"train.seed={seed}",
                    "train.threads=2",
                    "tracking.progress=never",
                    *args.extra,
                ]
                t0 = time.perf_counter()
                abdist("train", REPO / "configs/cifar10_lt/selmix.yaml", "--out", out, *fine)
                wall[f"{m}_s{seed}"] = round(time.perf_counter() - t0, 1)
                if seed not in based:  # the base's figures, once per seed
                    based.add(seed)
                    selmix_rows.setdefault("la_train", []).append(_recall_figures(base))
                selmix_rows.setdefault(m, []).append(_recall_figures(out))
                results[m].append(json.loads((out / "metrics.json").read_text())["balanced_error"])
                continue
            if m.startswith("autobalance"):
                over.append(f"autobalance.warmup_epochs={max(0, min(epochs - 1, epochs // 4))}")
            t0 = time.perf_counter()
            abdist("train", REPO / "configs/cifar10_lt" / f"{m}.yaml", "--out", out, *over)
            wall[f"{m}_s{seed}"] = round(time.perf_counter() - t0, 1)
            metrics = json.loads((out / "metrics.json").read_text())
            results[m].append(metrics["balanced_error"])
            if m == "ce":
                results["ce_posthoc_la"].append(posthoc_la(out))
    summary = {k: round(100 * statistics.mean(v), 2) for k, v in results.items() if v}
    for k, v in summary.items():
        print(
            f"{k:>16}: balanced error {v:.2f} %  (seeds: {[round(100 * x, 2) for x in results[k]]})"
        )
    print(json.dumps({
        "benchmark": "cifar10_lt", "device": "cpu", "model": args.model, "epochs": epochs,
        "seeds": seeds, "balanced_error_pct": summary,
        "per_seed": {k: [round(100 * x, 2) for x in v] for k, v in results.items() if v},
        "wall_s": wall,
        **({"selmix_recall_pct": selmix_rows} if selmix_rows else {}),
    }))  # fmt: skip


if __name__ == "__main__":
    main()
