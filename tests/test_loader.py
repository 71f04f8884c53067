"""ShardSplit: coverage, determinism, equal batches per rank, exact evaluation, bad data.

Shards are written here with ``webdataset.TarWriter`` in the abdist-shards/1 layout (the shard
writer lives elsewhere). Worker processes are real DataLoader workers; the multi-rank test runs
real processes with the gloo backend.
"""

from __future__ import annotations

import datetime
import hashlib
import io
import json
import os
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from abdist.data.loader import ShardSplit
from abdist.data.samples import BadSampleWarning
from abdist.data.tar_reader import shard_samples
from abdist.errors import UserError

wds = pytest.importorskip("webdataset")

NUM_CLASSES = 5
SIZE = 8


def _encode(array: np.ndarray, fmt: str) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG" if fmt == "png" else "JPEG", quality=95)
    return buf.getvalue()


def write_shards(
    root: Path,
    splits: dict[str, list[int]],
    *,
    fmt: str = "png",
    corrupt: dict[tuple[str, int], str] | None = None,
    seed: int = 0,
    mean: list[float] | None = None,
    std: list[float] | None = None,
    groups: int = 0,
) -> dict[str, dict[int, tuple[int, np.ndarray]]]:
    """Write ``<split>-NNNNNN.tar`` shards of the given sizes + manifest.json under ``root``.

    Sample ``i`` of a split has label ``i % NUM_CLASSES`` and a random 8x8 RGB image.
    ``corrupt[(split, i)]`` damages sample ``i``: ``"image"`` (bytes that are no image),
    ``"truncated"`` (half an encoded JPEG), ``"label"`` (label out of range), ``"no_cls"``;
    with ``groups`` > 0 sample ``i`` has group ``i % groups``, and ``"no_grp"`` / ``"grp"``
    (out of range) damage it.
    Returns ``{split: {i: (label, image HWC uint8)}}`` for the intact samples.
    """
    corrupt = corrupt or {}
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=True)
    truth: dict[str, dict[int, tuple[int, np.ndarray]]] = {}
    manifest = {
        "format": "abdist-shards/1",
        "class_names": [f"class{c}" for c in range(NUM_CLASSES)],
        "num_classes": NUM_CLASSES,
        "group_names": [f"g{k}" for k in range(groups)] or None,
        "image": {"channels": 3, "size": SIZE},
        "splits": {},
    }
    if mean is not None:
        manifest["image"].update(mean=mean, std=std)
    for split, sizes in splits.items():
        truth[split], shards, counts, i = {}, [], [0] * NUM_CLASSES, 0
        cells = [[0] * NUM_CLASSES for _ in range(groups)]
        for k, n in enumerate(sizes):
            name = f"{split}-{k:06d}.tar"
            with wds.TarWriter(str(root / name)) as writer:
                for _ in range(n):
                    image = rng.integers(0, 256, (SIZE, SIZE, 3), dtype=np.uint8)
                    label = i % NUM_CLASSES
                    counts[label] += 1
                    sample = {
                        "__key__": f"{split}-{i:08d}",
                        fmt: _encode(image, fmt),
                        "cls": str(label).encode(),
                        "idx": str(i).encode(),
                    }
                    if groups:
                        sample["grp"] = str(i % groups).encode()
                        cells[i % groups][label] += 1
                    damage = corrupt.get((split, i))
                    if damage == "image":
                        sample[fmt] = b"this is not an image"
                    elif damage == "truncated":
                        sample[fmt] = _encode(image, "jpg")[:60]
                    elif damage == "label":
                        sample["cls"] = str(NUM_CLASSES + 2).encode()
                    elif damage == "no_cls":
                        del sample["cls"]
                    elif damage == "no_grp":
                        del sample["grp"]
                    elif damage == "grp":
                        sample["grp"] = str(groups).encode()
                    writer.write(sample)
                    if damage is None:
                        truth[split][i] = (label, image)
                    i += 1
            digest = hashlib.sha256((root / name).read_bytes()).hexdigest()
            shards.append({"name": name, "num_samples": n, "sha256": digest})
        manifest["splits"][split] = {"num_samples": i, "class_counts": counts, "shards": shards}
        if groups:
            manifest["splits"][split]["group_class_counts"] = cells
    (root / "manifest.json").write_text(json.dumps(manifest))
    return truth


def _ids(split: ShardSplit, batch_size: int, **kw) -> list[int]:
    return [i for _, _, idx in split.batches(batch_size, with_ids=True, **kw) for i in idx.tolist()]


# --- single process, real workers --------------------------------------------------------------


@pytest.mark.numerics
def test_eval_pass_decodes_labels_and_normalises_exactly(tmp_path):
    truth = write_shards(tmp_path, {"val": [23, 17]}, mean=[0.2, 0.4, 0.6], std=[0.5, 0.25, 0.2])
    split = ShardSplit(tmp_path, "val", num_workers=0)
    assert len(split) == 40 and split.image_shape == (3, SIZE, SIZE)
    assert split.mean == (0.2, 0.4, 0.6)
    seen = []
    for x, y, idx in split.batches(16, shuffle=False, with_ids=True):
        assert x.dtype == torch.float32 and x.shape[1:] == (3, SIZE, SIZE)
        for xi, yi, i in zip(x, y.tolist(), idx.tolist()):
            label, image = truth["val"][i]
            assert yi == label
            expected = torch.from_numpy(image).permute(2, 0, 1).float() / 255
            restored = (
                xi * torch.tensor(split.std)[:, None, None]
                + torch.tensor(split.mean)[:, None, None]
            )
            torch.testing.assert_close(restored, expected, atol=1e-5, rtol=0)  # PNG: lossless
            seen.append(i)
    assert sorted(seen) == list(range(40))  # in order within this single slot
    assert seen == list(range(40))
    assert split.eval_num_batches(16) == 3


def test_defaults_to_half_mean_std_and_two_tuples(tmp_path):
    write_shards(tmp_path, {"val": [10]})
    split = ShardSplit(tmp_path, "val")
    assert split.mean == (0.5, 0.5, 0.5) and split.std == (0.5, 0.5, 0.5)
    batches = list(split.batches(4, shuffle=False))
    assert all(len(b) == 2 for b in batches)
    x = torch.cat([b[0] for b in batches])
    assert x.min() >= -1 and x.max() <= 1 and x.min() < -0.9 and x.max() > 0.9


@pytest.mark.parametrize(
    "sizes, world, workers",
    [([40, 40, 40, 40, 40], 2, 2), ([7, 150, 3], 3, 2), ([200], 2, 2), ([5, 5], 3, 0)],
)
def test_eval_visits_every_sample_exactly_once_across_ranks_and_workers(
    tmp_path, sizes, world, workers
):
    write_shards(tmp_path, {"test": sizes})
    n = sum(sizes)
    ids = []
    for rank in range(world):
        split = ShardSplit(tmp_path, "test", rank=rank, world_size=world, num_workers=workers)
        rank_ids = _ids(split, 16, shuffle=False)
        assert len(rank_ids) == len(set(rank_ids))
        ids += rank_ids
    assert sorted(ids) == list(range(n))  # no sample missing, none twice (no padding)


@pytest.mark.parametrize("drop_last", [False, True])
def test_training_epoch_has_equal_full_batches_on_every_rank(tmp_path, drop_last):
    # 3 uneven shards, 2 ranks x 2 workers = 4 slots: fewer shards than slots, sizes unequal.
    write_shards(tmp_path, {"train": [90, 10, 100]})
    batch, world = 32, 2
    per_rank, ids = [], []
    for rank in range(world):
        split = ShardSplit(
            tmp_path, "train", rank=rank, world_size=world, num_workers=2, shuffle_buffer=20
        )
        expected = split.num_batches(batch, drop_last=drop_last)
        gen = torch.Generator().manual_seed(7)
        batches = list(
            split.batches(batch, shuffle=True, generator=gen, drop_last=drop_last, with_ids=True)
        )
        assert len(batches) == expected
        assert all(len(y) == batch // world for _, y, _ in batches)  # batch is the global one
        per_rank.append(len(batches))
        ids += [i for _, _, idx in batches for i in idx.tolist()]
    assert per_rank == ([6, 6] if drop_last else [7, 7])  # floor / ceil of 200 / 32
    if drop_last:  # 192 of 200 drawn, none twice
        assert len(ids) == 192 and len(set(ids)) == 192
    else:  # every sample drawn, 24 repeats to fill the last batches
        assert set(ids) == set(range(200)) and len(ids) == 224


def test_same_generator_state_reproduces_the_epoch(tmp_path):
    write_shards(tmp_path, {"train": [30, 30, 30, 30]})
    split = ShardSplit(tmp_path, "train", num_workers=2, shuffle_buffer=25)

    def epoch(seed):
        gen = torch.Generator().manual_seed(seed)
        out = list(split.batches(8, shuffle=True, generator=gen, with_ids=True))
        return torch.cat([b[2] for b in out]), torch.cat([b[0] for b in out])

    ids_a, x_a = epoch(3)
    ids_b, x_b = epoch(3)
    ids_c, _ = epoch(4)
    assert torch.equal(ids_a, ids_b) and torch.equal(x_a, x_b)
    assert not torch.equal(ids_a, ids_c)
    assert sorted(ids_a.tolist()) == list(range(120))
    assert ids_a.tolist() != sorted(ids_a.tolist())  # shuffled


def test_training_reads_on_when_a_range_has_only_bad_samples(tmp_path):
    # Rank 1's range (positions 10..19 of 20) holds only bad samples: it borrows from the whole
    # split instead of hanging or yielding fewer batches than rank 0.
    corrupt = {("train", i): "image" for i in range(10, 20)}
    write_shards(tmp_path, {"train": [20]}, corrupt=corrupt)
    for rank in range(2):
        split = ShardSplit(tmp_path, "train", rank=rank, world_size=2, shuffle_buffer=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", BadSampleWarning)
            batches = list(
                split.batches(10, shuffle=True, generator=torch.Generator(), with_ids=True)
            )
        assert len(batches) == 2
        assert all(i < 10 for _, _, idx in batches for i in idx.tolist())


def test_training_split_with_no_readable_sample_raises(tmp_path):
    write_shards(tmp_path, {"train": [6]}, corrupt={("train", i): "label" for i in range(6)})
    split = ShardSplit(tmp_path, "train", num_workers=1)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        with pytest.raises(UserError, match="no readable sample"):
            list(split.batches(2, shuffle=True, generator=torch.Generator()))


# --- bad data -----------------------------------------------------------------------------------


def test_bad_samples_are_skipped_counted_and_named(tmp_path):
    corrupt = {
        ("val", 3): "image",
        ("val", 17): "truncated",
        ("val", 25): "label",
        ("val", 31): "no_cls",
    }
    write_shards(tmp_path, {"val": [20, 20]}, fmt="jpg", corrupt=corrupt)
    split = ShardSplit(tmp_path, "val", num_workers=2)
    with pytest.warns(BadSampleWarning) as caught:
        ids = _ids(split, 8, shuffle=False)
    assert sorted(ids) == sorted(set(range(40)) - {3, 17, 25, 31})
    assert split.bad_sample_counts == {
        "decode": 2,
        "label": 1,
        "missing": 1,
        "total": 4,
    }
    messages = " | ".join(str(w.message) for w in caught)
    assert "'val-00000003' in shard val-000000.tar" in messages
    assert "'val-00000017' in shard val-000000.tar" in messages
    assert "'val-00000025' in shard val-000001.tar (label: label 7 outside [0, 5))" in messages
    assert {r["key"] for r in split.bad_samples} == {f"val-{i:08d}" for i in (3, 17, 25, 31)}
    # Counts accumulate over passes (here a training epoch of the same split).
    with pytest.warns(BadSampleWarning):
        list(split.batches(8, shuffle=True, generator=torch.Generator()))
    assert split.bad_sample_counts["total"] == 8


@pytest.mark.parametrize(
    "damage, needle",
    [("image", "image does not decode"), ("label", "label 7 outside [0, 5)")],
)
def test_bad_data_error_raises_one_line_user_error_with_location(tmp_path, damage, needle):
    write_shards(tmp_path, {"train": [10, 10]}, corrupt={("train", 13): damage})
    split = ShardSplit(tmp_path, "train", num_workers=2, bad_data="error")
    with pytest.raises(UserError) as info:
        list(split.batches(4, shuffle=False))
    message = str(info.value)
    assert "\n" not in message
    assert "'train-00000013'" in message and "train-000001.tar" in message and needle in message
    with pytest.raises(UserError, match="train-00000013"):  # training passes too
        list(split.batches(4, shuffle=True, generator=torch.Generator()))


def _cut(shard: Path, size: int) -> None:
    shard.chmod(0o644)
    shard.write_bytes(shard.read_bytes()[:size])


@pytest.mark.parametrize("bad_data", ["skip", "error"])
def test_truncated_shard_is_a_damaged_file_never_skipped(tmp_path, bad_data):
    write_shards(tmp_path, {"val": [30, 10]})
    shard = tmp_path / "val-000000.tar"
    size = shard.stat().st_size
    _cut(shard, size // 2 + 100)  # not whole tar blocks: refused by one stat, before reading
    with pytest.raises(UserError, match=r"val-000000\.tar is damaged: .*512-byte tar blocks"):
        ShardSplit(tmp_path, "val", bad_data=bad_data)
    _cut(shard, (size // 2) // 512 * 512)  # whole blocks: found while reading, in a worker too
    split = ShardSplit(tmp_path, "val", num_workers=2, bad_data=bad_data)
    with warnings.catch_warnings():
        warnings.simplefilter("error", BadSampleWarning)  # no sample of it is "skipped"
        with pytest.raises(UserError, match=r"val-000000\.tar is damaged: .*abdist prepare"):
            list(split.batches(8, shuffle=False))
        with pytest.raises(UserError, match=r"val-000000\.tar is damaged"):
            list(split.batches(8, shuffle=True, generator=torch.Generator()))
    assert split.bad_sample_counts["total"] == 0


def test_shard_cut_between_samples_or_holding_extra_samples_is_damaged(tmp_path):
    write_shards(tmp_path, {"val": [12]})
    shard = tmp_path / "val-000000.tar"
    members = list(tarfile.open(shard))
    # Cut exactly where sample 6 starts: whole blocks, every sample before it intact; only the
    # missing end-of-archive marker (and the count) say the file is short.
    first6 = next(m for m in members if m.name.startswith("val-00000006"))
    _cut(shard, first6.offset)
    split = ShardSplit(tmp_path, "val")
    with pytest.raises(UserError, match="damaged: truncated: no tar end-of-archive marker"):
        list(split.batches(4, shuffle=False))
    # The manifest lists fewer samples than the shard holds: damaged as well.
    write_shards(tmp_path, {"val": [12]})
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    manifest["splits"]["val"]["num_samples"] = 11
    manifest["splits"]["val"]["shards"][0]["num_samples"] = 11
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="holds more samples than the 11 the manifest lists"):
        list(ShardSplit(tmp_path, "val").batches(4, shuffle=False))


def test_corrupt_tar_header_is_reported(tmp_path):
    write_shards(tmp_path, {"val": [12]})
    shard = tmp_path / "val-000000.tar"
    data = bytearray(shard.read_bytes())
    # Find the 6th sample's first header and break its checksum.
    offsets = [m.offset for m in tarfile.open(shard) if m.name.startswith("val-00000006")]
    data[offsets[0] + 10] ^= 0xFF
    shard.write_bytes(bytes(data))
    split = ShardSplit(tmp_path, "val")
    with pytest.raises(UserError) as info:
        _ids(split, 4, shuffle=False)
    message = str(info.value)
    assert "\n" not in message and "val-000000.tar is damaged" in message
    assert "checksum mismatch" in message and "after sample 'val-00000005'" in message


def test_max_bad_fraction_stops_a_pass_with_how_many_of_how_many(tmp_path):
    corrupt = {("train", i): "image" for i in range(0, 40, 4)}  # 10 of 40
    write_shards(tmp_path, {"train": [20, 20]}, corrupt=corrupt)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        ok = ShardSplit(tmp_path, "train", num_workers=2, max_bad_fraction=0.25)
        assert len(_ids(ok, 8, shuffle=False)) == 30  # 10 / 40 is not more than 0.25
        assert len(list(ok.batches(8, shuffle=True, generator=torch.Generator()))) == 5
        for shuffle in (False, True):
            split = ShardSplit(tmp_path, "train", num_workers=2, max_bad_fraction=0.2)
            with pytest.raises(UserError) as info:
                list(split.batches(8, shuffle=shuffle, generator=torch.Generator()))
            message = str(info.value)
            assert (
                "\n" not in message and "of 40 samples of split 'train' are unreadable" in message
            )
            assert "data.max_bad_fraction=0.2 allows (8)" in message
        with pytest.raises(UserError, match="max_bad_fraction"):
            ShardSplit(tmp_path, "train", max_bad_fraction=1.5)


# --- the tar reader and the manifest ------------------------------------------------------------


def test_tar_reader_matches_tarfile_on_pax_and_gnu_long_names(tmp_path):
    path = tmp_path / "x.tar"
    long = "d" * 120 + "/sample-000"
    with tarfile.open(path, "w", format=tarfile.GNU_FORMAT) as tar:
        for key in ("a", long + "1", long + "2"):
            for ext, payload in (("jpg", b"\x01" * 700), ("cls", b"3")):
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    got = list(shard_samples(str(path), 0, 10))
    assert [(p, k) for p, k, _ in got] == [(0, "a"), (1, long + "1"), (2, long + "2")]
    assert got[2][2] == {"jpg": b"\x01" * 700, "cls": b"3"}
    # TarWriter's pax headers (float mtimes) and a start offset.
    with wds.TarWriter(str(tmp_path / "y.tar")) as w:
        for i in range(5):
            w.write({"__key__": f"k{i}", "txt": f"value {i}".encode(), "cls": b"1"})
    got = list(shard_samples(str(tmp_path / "y.tar"), 2, 4))
    assert [(p, k, f["txt"]) for p, k, f in got] == [(2, "k2", b"value 2"), (3, "k3", b"value 3")]


def test_manifest_problems_are_clear_user_errors(tmp_path):
    with pytest.raises(UserError, match="manifest.json: not found"):
        ShardSplit(tmp_path, "train")
    write_shards(tmp_path, {"train": [4, 4]})
    with pytest.raises(UserError, match=r"no split 'val' .*\['train'\]"):
        ShardSplit(tmp_path, "val")
    with pytest.raises(UserError, match="rank"):
        ShardSplit(tmp_path, "train", rank=2, world_size=2)
    with pytest.raises(UserError, match="bad_data"):
        ShardSplit(tmp_path, "train", bad_data="ignore")
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    (tmp_path / "train-000001.tar").unlink()
    with pytest.raises(
        UserError, match=r"shard .*train-000001\.tar listed in the manifest is missing"
    ):
        ShardSplit(tmp_path, "train")
    manifest["splits"]["train"]["shards"][1]["name"] = "train.beton"
    (tmp_path / "train.beton").write_bytes(b"")
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(
        UserError, match="is an FFCV directory.*not WebDataset tar shards.*FFCVSplit"
    ):
        ShardSplit(tmp_path, "train")
    manifest["format"] = "something/2"
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(UserError, match="expected 'abdist-shards/1'"):
        ShardSplit(tmp_path, "train")


def test_eval_transform_runs_in_workers_and_bad_transforms_are_named(tmp_path):
    from torchvision.transforms import v2

    write_shards(tmp_path, {"val": [12]})
    split = ShardSplit(tmp_path, "val", num_workers=2, eval_transform=v2.CenterCrop(4))
    assert {tuple(x.shape[1:]) for x, _ in split.batches(5, shuffle=False)} == {(3, 4, 4)}
    wrong = ShardSplit(tmp_path, "val", eval_transform=lambda x: (x * 255).to(torch.uint8))
    with pytest.raises(UserError, match="eval_transform returned torch.uint8"):
        list(wrong.batches(5, shuffle=False))


def test_batches_augment_hook_runs_on_normalised_batches(tmp_path):
    write_shards(tmp_path, {"val": [12]})
    split = ShardSplit(tmp_path, "val")
    calls = []

    def hook(x, y, generator, batch):
        calls.append(generator)
        return x * 0

    gen = torch.Generator()
    batches = list(split.batches(6, shuffle=True, generator=gen, augment=hook))
    assert len(batches) == 2 and all(torch.all(x == 0) for x, _ in batches)
    assert calls == [gen, gen]


@pytest.mark.parametrize("workers", [0, 2])
def test_crop_flip_runs_in_the_workers_seeded_by_pass_seed_rank_and_batch(tmp_path, workers):
    """A TrainAugment's crop/flip is drawn in the loader workers, batch `index` from a generator
    seeded by (the pass seed drawn from the epoch's generator, the rank, index): whichever worker
    makes a batch, and without touching the epoch generator after the pass seed."""
    from abdist.data.augment import RandomCropFlip, TrainAugment
    from abdist.data.planning import derive_seed, seed_from

    write_shards(tmp_path, {"train": [30, 30]})
    split = ShardSplit(tmp_path, "train", rank=1, world_size=2, num_workers=workers,
                       shuffle_buffer=8, multiprocessing_context="fork")  # fmt: skip
    crop = RandomCropFlip(2, flip=True)
    aug = TrainAugment(None, crop, tuple(split.mean), tuple(split.std))

    def epoch(augment):
        gen = torch.Generator().manual_seed(4)
        out = list(split.batches(6, shuffle=True, generator=gen, augment=augment, first_batch=9))
        return out, gen.get_state()

    (got, after), (plain, plain_after) = epoch(aug), epoch(None)
    assert torch.equal(after, plain_after)  # the crop took nothing from the epoch's generator
    pass_seed = seed_from(torch.Generator().manual_seed(4))
    assert len(got) == len(plain) == 10  # 60 samples, global batch 6
    for k, ((x, y), (x0, y0)) in enumerate(zip(got, plain)):
        g = torch.Generator().manual_seed(derive_seed(pass_seed, "crop", 1, 9 + k))
        assert torch.equal(y, y0) and torch.equal(x, crop(x0, y0, g)), k
        assert not torch.equal(x, x0)


# --- real ranks: gloo + all_gather_object --------------------------------------------------------


def _rank_main(rank: int, root: str, out: str) -> None:
    import torch.distributed as dist

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{out}.store",
        rank=rank,
        world_size=2,
        timeout=datetime.timedelta(seconds=60),
    )
    # rank/world_size come from torch.distributed. Workers fork, as under torchrun: a spawned
    # rank would otherwise spawn its workers too (slow: a fresh interpreter each). PIL decodes,
    # so that these fresh processes need not import torchvision.
    kw = dict(num_workers=2, multiprocessing_context="fork", decoder="pil")
    test = ShardSplit(root, "test", **kw)
    ids = [int(i) for _, _, idx in test.batches(16, shuffle=False, with_ids=True) for i in idx]
    train = ShardSplit(root, "train", shuffle_buffer=16, **kw)
    gen = torch.Generator().manual_seed(11)  # the same on every rank, as in the trainer
    steps, train_ids = 0, []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        for _, y, idx in train.batches(32, shuffle=True, generator=gen, with_ids=True):
            # A collective per batch, as DDP does: unequal batch counts would hang here.
            total = torch.tensor([float(y.sum())])
            dist.all_reduce(total)
            steps += 1
            train_ids += idx.tolist()
    gathered = [None, None]
    dist.all_gather_object(
        gathered,
        {
            "ids": ids,
            "steps": steps,
            "num_batches": train.num_batches(32),
            "train_ids": train_ids,
            "bad": train.bad_sample_counts,
        },
    )
    if rank == 0:
        Path(out).write_text(json.dumps(gathered))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """Run 2 real ranks (spawned processes, gloo) x 2 DataLoader workers once for this module."""
    import torch.multiprocessing as mp

    root = tmp_path_factory.mktemp("ranks")
    # test: 5 shards; train: 3 uneven shards (< 2 ranks x 2 workers) with 2 corrupt images.
    write_shards(
        root,
        {"test": [40, 40, 40, 40, 37], "train": [100, 35, 60]},
        corrupt={("train", 5): "image", ("train", 150): "image"},
    )
    out = root / "result.json"
    mp.start_processes(_rank_main, args=(str(root), str(out)), nprocs=2, start_method="spawn")
    return json.loads(out.read_text())


def test_two_ranks_evaluate_every_sample_exactly_once(two_ranks):
    ids = two_ranks[0]["ids"] + two_ranks[1]["ids"]
    assert sorted(ids) == list(range(197))
    assert two_ranks[0]["ids"] and two_ranks[1]["ids"]


def test_two_ranks_train_the_same_number_of_batches_on_uneven_shards(two_ranks):
    steps = [r["steps"] for r in two_ranks]
    assert steps == [r["num_batches"] for r in two_ranks] == [7, 7]  # ceil(195 / 32)
    ids = two_ranks[0]["train_ids"] + two_ranks[1]["train_ids"]
    # All 193 good samples drawn, plus repeats to fill 2 x 7 full batches; no corrupt one.
    assert len(ids) == 224 and set(ids) == set(range(195)) - {5, 150}
    assert sum(r["bad"]["decode"] for r in two_ranks) == 2  # each corrupt image counted once


def test_group_ids_stream_with_their_samples_and_bad_ones_are_skipped(tmp_path):
    corrupt = {("val", 3): "no_grp", ("val", 8): "grp"}
    write_shards(tmp_path, {"val": [12, 9]}, groups=3, corrupt=corrupt)
    split = ShardSplit(tmp_path, "val", num_workers=2)
    cells = [[sum(1 for i in range(21) if (i % 3, i % NUM_CLASSES) == (g, c))
              for c in range(NUM_CLASSES)] for g in range(3)]  # fmt: skip
    assert split.num_groups == 3 and split.cell_counts() == cells  # as the manifest says
    seen = {}
    with pytest.warns(BadSampleWarning) as caught:  # one readable line per skipped sample
        for _, _, idx, g in split.batches(5, shuffle=False, with_ids=True, with_groups=True):
            seen.update(zip(idx.tolist(), g.tolist()))
    messages = sorted(str(w.message) for w in caught)
    assert "no .grp member" in messages[0] and "group 3 outside [0, 3)" in messages[1]
    assert seen == {i: i % 3 for i in range(21) if i not in (3, 8)}
    assert split.bad_sample_counts["total"] == 2


def test_torchvision_decode_op_gives_the_public_decoders_pixels():
    """decode_image calls torchvision's registered op directly (no per-call wrapper overhead):
    on colour and grayscale JPEGs and PNGs, read as RGB and as gray, it must give exactly what
    torchvision.io.decode_image gives, and PNGs in their own mode exactly what PIL gives."""
    from PIL import Image
    from torchvision.io import ImageReadMode
    from torchvision.io import decode_image as public

    from abdist.data.samples import decode_image

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (12, 10, 3), dtype=np.uint8)
    for mode in ("RGB", "L"):
        for fmt in ("JPEG", "PNG"):
            buf = io.BytesIO()
            Image.fromarray(pixels).convert(mode).save(buf, format=fmt)
            data = buf.getvalue()
            for channels, read in ((3, ImageReadMode.RGB), (1, ImageReadMode.GRAY)):
                got = decode_image(data, channels, "torchvision")
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", DeprecationWarning)
                    want = public(torch.frombuffer(bytearray(data), dtype=torch.uint8), mode=read)
                assert got.shape == (channels, 12, 10) and torch.equal(got, want), (mode, fmt)
                if fmt == "PNG" and channels == len(mode):  # PIL's RGB -> L rounds otherwise
                    assert torch.equal(got, decode_image(data, channels, "pil")), (mode, channels)
