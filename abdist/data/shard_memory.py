"""Load prepared shards fully into memory: the fast path for datasets that fit in RAM.

CIFAR-sized data (tens of thousands of small images) decodes in seconds and then trains with
batched tensor augmentation, with no loader workers at all. Larger data streams through the
WebDataset loader instead (`data.in_memory=false`).

Nothing is trained on data that is not what ``abdist prepare`` wrote:

- Every shard file is read whole anyway, so its sha256 is computed from the bytes read and
  compared with the manifest's (``hashlib`` at ~1 ms per MB, a few percent of the decoding);
  a missing file, a mismatch, a tar that does not parse or a shard that holds another number of
  samples than the manifest lists is a *damaged shard*: always a one-line ``UserError`` naming
  it (re-run ``abdist prepare``; ``abdist verify`` lists every problem), whatever ``bad_data``
  says. All files are looked up (one ``stat`` each) before anything is decoded.
- A *bad sample* (its image does not decode, a label or group out of range, a member missing:
  :func:`abdist.data.samples.sample_fields`, the same rule as the streaming reader) follows
  ``bad_data`` exactly as streamed: ``"skip"`` leaves it out, warns
  (:class:`~abdist.data.samples.BadSampleWarning`) and counts it; ``"error"`` stops with one line
  naming shard and key. More skipped samples than ``max_bad_fraction`` of a split stop the load.
- An FFCV directory (``--format ffcv``) is refused in one line.
- Images decode exactly as streamed (:func:`abdist.data.samples.decode_sample`: torchvision,
  PIL as fallback; fitted to the manifest's ``image.size`` when a file's size differs), so
  ``data.in_memory=true`` and ``false`` see the same pixels.

Skipped samples are reported like the streaming loader's: the bundle then has
``bad_sample_counts``, and each full pass over a split adds that split's skipped count, so the
trainer's ``bad_samples`` is, as streamed, the epoch's train + val passes in ``log.jsonl`` and the
test pass in ``metrics.json`` (partial passes, AutoBalance's hyper-step batches, add nothing).
When nothing was skipped the bundle is a plain :class:`~abdist.data.memory.DataBundle`, exactly
as before (no ``bad_samples`` key).
"""

from __future__ import annotations

import dataclasses
import io
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from abdist.data.manifest import (
    check_shard_file,
    damaged_shard,
    manifest_num_groups,
    read_manifest,
    read_shard_checked,
    require_wds_shards,
)
from abdist.data.memory import DataBundle, TensorSplit
from abdist.data.samples import (
    BAD_REASONS,
    BadSample,
    bad_sample_error,
    check_read_options,
    decode_sample,
    over_bad_limit,
    sample_fields,
    too_many_bad,
    warn_skipped,
)
from abdist.data.tar_reader import TarError, tar_samples
from abdist.errors import UserError

SPLITS = ("train", "val", "test")


@dataclass
class CountedSplit(TensorSplit):
    """A :class:`TensorSplit` from which bad samples were skipped at load: each full pass of
    rank 0 adds ``skipped`` (reason -> count) to the bundle's shared ``tally``, as a streamed pass
    counts the bad samples it meets."""

    skipped: dict[str, int] = field(default_factory=dict)
    tally: dict[str, int] = field(default_factory=dict, repr=False)

    def batches(self, batch_size: int, **kw):
        if kw.get("max_batches") is None and kw.get("rank", 0) == 0:
            for reason, n in self.skipped.items():
                self.tally[reason] = self.tally.get(reason, 0) + n
        yield from super().batches(batch_size, **kw)

    def shard(self, rank: int, world_size: int) -> CountedSplit:
        part = super().shard(rank, world_size)
        skipped = self.skipped if rank == 0 else {}  # every rank holds all: count it once
        return CountedSplit(
            part.images, part.labels, part.groups, part.ids, skipped=skipped, tally=self.tally
        )


@dataclass
class CountedBundle(DataBundle):
    """A :class:`DataBundle` with ``bad_sample_counts``: in-memory shards with skipped samples."""

    tally: dict[str, int] = field(default_factory=dict, repr=False)
    train_ids: int = 0  # the train split's samples in the manifest, skipped ones included

    @property
    def train_id_count(self) -> int:
        # Not 1 + the largest id read: the last train samples may have been skipped as bad,
        # and the streamed "train+val" numbers val after every train sample of the manifest.
        return self.train_ids

    @property
    def bad_sample_counts(self) -> dict[str, int]:
        """Skipped samples of the passes so far, by reason, plus ``"total"`` (this process)."""
        counts = {r: self.tally.get(r, 0) for r in BAD_REASONS}
        return {**counts, "total": sum(counts.values())}

    def with_val_merged(self) -> CountedBundle:
        merged = super().with_val_merged()
        t, v = self.train, self.val
        skipped = {r: _skipped(t).get(r, 0) + _skipped(v).get(r, 0) for r in BAD_REASONS}
        m = merged.train
        train = CountedSplit(m.images, m.labels, m.groups, m.ids, skipped=skipped, tally=self.tally)
        return dataclasses.replace(merged, train=train)


def _skipped(split: TensorSplit) -> dict[str, int]:
    return getattr(split, "skipped", {})


class _Skips:
    """Bad samples skipped during one load: counts per split and reason, capped warnings."""

    def __init__(self, bad_data: str) -> None:
        self.bad_data, self.warned = bad_data, 0

    def note(self, counts: dict[str, int], path: Path, key: str, bad: BadSample) -> None:
        if self.bad_data == "error":
            raise bad_sample_error(key, str(path), bad.detail)
        counts[bad.reason] += 1
        self.warned = warn_skipped(
            self.warned, path.name, key, bad.reason, bad.detail, stacklevel=5
        )


def _read_split(
    root: Path, manifest: dict, split: str, skips: _Skips
) -> tuple[list[np.ndarray], list[int], list[int], dict[str, int]]:
    """Decoded images ([C, H, W] uint8), labels, sample ids, groups (empty without groups) and
    the skipped counts by reason of one split, every shard checked against the manifest."""
    channels = manifest["image"]["channels"]
    # The streamed reader's decode: the same decoder, and images whose size differs from the
    # manifest's fixed image.size fitted to it (without one, sizes must agree; see below).
    fixed = manifest["image"].get("size")
    size = (int(fixed), int(fixed)) if fixed else None
    num_classes = len(manifest["class_names"])
    num_groups = manifest_num_groups(manifest)
    images, labels, ids, groups = [], [], [], []
    skipped = dict.fromkeys(BAD_REASONS, 0)
    for entry in manifest["splits"][split]["shards"]:
        path = root / entry["name"]
        want = entry["num_samples"]
        data = read_shard_checked(path, entry)  # missing, changed or cut off: one line
        found = 0
        try:
            # One sample further than the manifest lists: there must be none.
            for pos, key, fields in tar_samples(io.BytesIO(data), 0, want + 1):
                if pos >= want:
                    raise damaged_shard(
                        path, f"it holds more samples than the {want} the manifest lists"
                    )
                found += 1
                try:
                    image, label, idx, group = sample_fields(fields, num_classes, num_groups)
                    arr = decode_sample(image, channels, size).numpy()
                except BadSample as bad:
                    skips.note(skipped, path, key, bad)
                    continue
                images.append(arr)
                labels.append(label)
                ids.append(idx)
                if num_groups is not None:
                    groups.append(group)
        except TarError as e:
            raise damaged_shard(path, str(e)) from None
        if found != want:
            raise damaged_shard(path, f"it holds {found} samples, the manifest lists {want}")
    shapes = {a.shape for a in images}
    if len(shapes) > 1:
        raise UserError(
            f"{root}: images of different sizes {sorted(shapes)[:3]}; in-memory loading needs "
            "one size (prepare resized images or set data.in_memory=false)"
        )
    return images, labels, ids, groups, skipped


def load_shards_in_memory(
    root: str | Path, *, bad_data: str = "skip", max_bad_fraction: float | None = None
) -> DataBundle:
    """Decode every split of a prepared shard directory into normalised tensors.

    Per-channel mean/std are the training split's (no test statistics leak in), from the manifest.
    ``bad_data`` and ``max_bad_fraction`` (None: no limit) are ``data.bad_data`` and
    ``data.max_bad_fraction``; see the module docstring for what is checked.
    """
    check_read_options(bad_data, max_bad_fraction)
    root = Path(root)
    manifest = read_manifest(root)
    for split in SPLITS:
        if split not in manifest["splits"]:
            raise UserError(f"{root}/manifest.json has no '{split}' split; re-run `abdist prepare`")
    require_wds_shards(root, manifest, SPLITS)
    for split in SPLITS:  # a missing shard fails before minutes of decoding the others
        for entry in manifest["splits"][split]["shards"]:
            check_shard_file(root / entry["name"], entry)
    skips = _Skips(bad_data)
    raw = {}
    for split in SPLITS:
        raw[split] = _read_split(root, manifest, split, skips)
        bad = sum(raw[split][4].values())
        total = manifest["splits"][split]["num_samples"]
        if over_bad_limit(bad, total, max_bad_fraction):
            raise too_many_bad(split, bad, total, max_bad_fraction, raw[split][4])
    if not raw["train"][0]:
        raise UserError(f"{root}: the train split has no readable sample; re-run `abdist prepare`")
    shape = raw["train"][0][0].shape

    def stack(images: list[np.ndarray]) -> np.ndarray:
        if not images:
            return np.zeros((0, *shape), np.uint8)
        if images[0].shape != shape:
            raise UserError(
                f"{root}: images of different sizes {sorted({shape, images[0].shape})}; "
                "in-memory loading needs one size (prepare resized images or set "
                "data.in_memory=false)"
            )
        return np.stack(images)

    arrays = {s: stack(raw[s][0]) for s in SPLITS}
    train_x = torch.from_numpy(arrays["train"]).float() / 255.0
    image = manifest["image"]
    if "mean" in image:  # the statistics the streaming loaders use too: one normalisation
        mean = torch.tensor(image["mean"], dtype=torch.float32).view(1, -1, 1, 1)
        std = torch.tensor(image["std"], dtype=torch.float32).view(1, -1, 1, 1)
    else:  # shards prepared before the manifest carried them
        mean = train_x.mean(dim=(0, 2, 3), keepdim=True)
        std = train_x.std(dim=(0, 2, 3), keepdim=True).clamp_min(1e-6)

    any_skipped = any(n for s in SPLITS for n in raw[s][4].values())
    tally: dict[str, int] = {}

    def split(name):
        _, y, ids, g, skipped = raw[name]
        x = (torch.from_numpy(arrays[name]).float() / 255.0 - mean) / std
        args = (
            x,
            torch.tensor(y, dtype=torch.int64),
            torch.tensor(g) if g else None,
            torch.tensor(ids, dtype=torch.int64),
        )
        if not any_skipped:
            return TensorSplit(*args)
        return CountedSplit(*args, skipped={r: n for r, n in skipped.items() if n}, tally=tally)

    kw = dict(
        train=split("train"),
        val=split("val"),
        test=split("test"),
        class_names=list(manifest["class_names"]),
        in_channels=int(shape[0]),
        image_size=int(shape[1]),
        normalization=(tuple(mean.flatten().tolist()), tuple(std.flatten().tolist())),
    )
    if not any_skipped:
        return DataBundle(**kw)
    return CountedBundle(**kw, tally=tally, train_ids=manifest["splits"]["train"]["num_samples"])
