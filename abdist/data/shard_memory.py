"""Load prepared shards fully into memory: the fast path for datasets that fit in RAM.

CIFAR-sized data (tens of thousands of small images) decodes in seconds and then trains with
batched tensor augmentation, with no loader workers at all. Larger data streams through the
WebDataset loader instead (`data.in_memory=false`).
"""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from abdist.data.memory import DataBundle, TensorSplit
from abdist.data.shards import read_manifest
from abdist.errors import UserError


def _read_split(root: Path, manifest: dict, split: str) -> tuple[np.ndarray, np.ndarray, list]:
    import webdataset as wds

    info = manifest["splits"].get(split)
    if info is None:
        raise UserError(f"{root}/manifest.json has no '{split}' split; re-run `abdist prepare`")
    urls = [str(root / s["name"]) for s in info["shards"]]
    images, labels, groups = [], [], []
    if not urls:
        return np.zeros((0, 1, 1, 1), np.uint8), np.zeros(0, np.int64), []
    for sample in wds.WebDataset(urls, shardshuffle=False, empty_check=False):
        key = f"{sample['__url__']}:{sample['__key__']}"
        data = sample.get("png") or sample.get("jpg") or sample.get("jpeg")
        if data is None:
            raise UserError(f"{key}: sample has no png/jpg image")
        try:
            img = Image.open(io.BytesIO(data))
            img = img.convert("L" if manifest["image"]["channels"] == 1 else "RGB")
        except Exception as exc:  # PIL raises many types for corrupt data
            raise UserError(f"{key}: unreadable image ({exc.__class__.__name__})") from None
        arr = np.asarray(img, dtype=np.uint8)
        images.append(arr[None] if arr.ndim == 2 else arr.transpose(2, 0, 1))
        labels.append(int(sample["cls"]))
        if "grp" in sample:
            groups.append(int(sample["grp"]))
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise UserError(
            f"{root}: images of different sizes {sorted(shapes)[:3]}; in-memory loading needs "
            "one size (prepare resized images or set data.in_memory=false)"
        )
    return np.stack(images), np.asarray(labels, np.int64), groups


def load_shards_in_memory(root: str | Path) -> DataBundle:
    """Decode every split of a prepared shard directory into normalised tensors.

    Per-channel mean/std are the training split's (no test statistics leak in), from the manifest.
    """
    root = Path(root)
    manifest = read_manifest(root)
    raw = {s: _read_split(root, manifest, s) for s in ("train", "val", "test")}
    train_x = torch.from_numpy(raw["train"][0]).float() / 255.0
    image = manifest["image"]
    if "mean" in image:  # the statistics the streaming loaders use too: one normalisation
        mean = torch.tensor(image["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(image["std"], dtype=torch.float32).view(1, -1, 1, 1)
    else:  # shards prepared before the manifest carried them
        mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
        std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)

    def split(name):
        x, y, g = raw[name]
        x = (torch.from_numpy(x).float() / 255.0 - mean) / std
        return TensorSplit(x, torch.from_numpy(y), torch.tensor(g) if g else None)

    first = raw["train"][0]
    return DataBundle(
        train=split("train"),
        val=split("val"),
        test=split("test"),
        class_names=list(manifest["class_names"]),
        in_channels=int(first.shape[1]),
        image_size=int(first.shape[2]),
    )
