"""FFCV as an optional backend: ``prepare --format ffcv``, ``FFCVSplit`` and ``verify``.

A tiny image tree (4 classes, 32x32 RGB JPEGs with some grayscale JPEGs and PNGs, groups from a
CSV) is prepared in both formats with the same seed, so sample ``i`` of a split is the same image
in ``{split}.beton`` and in the WebDataset tar: the tar is the reference for labels and pixels.
Everything except the missing-extra test needs the ``ffcv`` extra and is skipped without it.
"""

from __future__ import annotations

import importlib.util
import io
import json
import shutil
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from abdist.data.manifest import read_manifest, sha256_file
from abdist.data.prepare import WRITERS, PrepareOptions, prepare
from abdist.data.shards import verify_shards
from abdist.errors import UserError

HAVE_FFCV = importlib.util.find_spec("ffcv") is not None
needs_ffcv = pytest.mark.skipif(
    not HAVE_FFCV,
    reason="ffcv is not installed (optional extra: ABDIST_WITH_FFCV=1 docker/install.sh VENV dev)",
)

TRAIN_PER_CLASS = (16, 12, 8, 6)
TEST_PER_CLASS = 5
SPLITS = ("train", "val", "test")


def make_tree(root: Path) -> Path:
    """``root/{train,test}/c{k}/NN.{jpg,png}`` plus ``root.csv`` mapping every file to a group."""
    rng = np.random.default_rng(0)
    rows = []
    for split, counts in (("train", TRAIN_PER_CLASS), ("test", (TEST_PER_CLASS,) * 4)):
        for c, n in enumerate(counts):
            d = root / split / f"c{c}"
            d.mkdir(parents=True)
            for k in range(n):
                small = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
                im = Image.fromarray(small).resize((32, 32), Image.BILINEAR)
                if k % 4 == 3:  # lossless source: stored as raw pixels
                    name = f"{k:02d}.png"
                    im.save(d / name)
                else:  # JPEG (every 5th grayscale): stored byte for byte
                    name = f"{k:02d}.jpg"
                    (im.convert("L") if k % 5 == 4 else im).save(d / name, quality=90)
                rows.append(f"{split}/c{c}/{name},{k % 2}\n")
    csv = root.parent / f"{root.name}.csv"
    csv.write_text("".join(rows))
    return csv


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(ffcv dir, wds dir) of the same tree, options and seed."""
    base = tmp_path_factory.mktemp("ffcv")
    csv = make_tree(base / "tree")
    out = {}
    for fmt in ("ffcv", "wds"):
        opts = PrepareOptions(format=fmt, groups=str(csv), val=0.25, seed=3)
        prepare(str(base / "tree"), base / fmt, opts)
        out[fmt] = base / fmt
    return out["ffcv"], out["wds"]


def tar_samples(directory: Path, split: str) -> dict[int, tuple[str, bytes, int]]:
    """``idx -> (ext, image bytes, label)`` from a split's WebDataset shards."""
    samples: dict[str, dict[str, bytes]] = {}
    for shard in sorted(directory.glob(f"{split}-*.tar")):
        with tarfile.open(shard) as tf:
            for m in tf.getmembers():
                key, _, field = m.name.partition(".")
                samples.setdefault(key, {})[field] = tf.extractfile(m).read()
    out = {}
    for fields in samples.values():
        ext = "jpg" if "jpg" in fields else "png"
        out[int(fields["idx"])] = (ext, fields[ext], int(fields["cls"]))
    return out


def eval_pass(split, batch_size: int):
    xs, ys, ids, sizes = [], [], [], []
    for x, y, i in split.batches(batch_size, shuffle=False, with_ids=True):
        xs.append(x), ys.append(y), ids.append(i), sizes.append(len(y))
    return torch.cat(xs), torch.cat(ys), torch.cat(ids), sizes


# --------------------------------------------------------------------------- always run


def test_missing_ffcv_is_one_clear_error(tmp_path, monkeypatch):
    assert "ffcv" in WRITERS  # so `abdist prepare --format ffcv` is offered
    monkeypatch.setitem(sys.modules, "ffcv", None)  # `import ffcv` now raises ImportError
    with pytest.raises(UserError, match="install the ffcv extra: apt-get install") as info:
        prepare("digits", tmp_path / "out", PrepareOptions(format="ffcv"))
    assert "\n" not in str(info.value)
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- with ffcv


@needs_ffcv
def test_prepare_writes_one_beton_per_split_and_verify_passes(prepared):
    ffcv_dir, wds_dir = prepared
    m, ref = read_manifest(ffcv_dir), read_manifest(wds_dir)
    names = sorted(p.name for p in ffcv_dir.iterdir())
    assert names == ["manifest.json", "test.beton", "train.beton", "val.beton"]
    assert {k: m["image"][k] for k in ("channels", "size")} == {"channels": 3, "size": 32} and m[
        "group_names"
    ] == ["0", "1"]
    for split in SPLITS:
        info = m["splits"][split]
        assert info["num_samples"] == ref["splits"][split]["num_samples"] > 0
        assert info["shards"] == [
            {
                "name": f"{split}.beton",
                "num_samples": info["num_samples"],
                "sha256": sha256_file(ffcv_dir / f"{split}.beton"),
            }
        ]
        for key in ("class_counts", "group_class_counts"):
            assert info[key] == ref["splits"][split][key]
    assert m["splits"]["test"]["class_counts"] == [TEST_PER_CLASS] * 4
    assert verify_shards(ffcv_dir) == []


@needs_ffcv
def test_prepare_is_byte_identical_when_repeated(prepared, tmp_path):
    ffcv_dir, _ = prepared
    again = tmp_path / "again"
    m = read_manifest(ffcv_dir)
    opts = PrepareOptions(format="ffcv", groups=m["options"]["groups"], val=0.25, seed=3)
    prepare(m["source"]["path"], again, opts)
    for split in SPLITS:
        assert sha256_file(again / f"{split}.beton") == sha256_file(ffcv_dir / f"{split}.beton")


@needs_ffcv
@pytest.mark.parametrize("split", SPLITS)
@pytest.mark.numerics
def test_eval_pass_yields_each_sample_once_with_its_label_and_pixels(prepared, split):
    from abdist.data.ffcv_backend import FFCVSplit

    ffcv_dir, wds_dir = prepared
    info = read_manifest(ffcv_dir)["splits"][split]
    data = FFCVSplit(ffcv_dir, split, num_workers=2, mean=0.0, std=1.0)
    assert len(data) == info["num_samples"] and data.image_shape == (3, 32, 32)
    x, y, ids, sizes = eval_pass(data, 8)
    n = info["num_samples"]
    assert sorted(ids.tolist()) == list(range(n))
    assert sizes == [8] * (n // 8) + ([n % 8] if n % 8 else [])
    assert len(sizes) == data.eval_num_batches(8)
    assert torch.bincount(y, minlength=4).tolist() == info["class_counts"]
    ref = tar_samples(wds_dir, split)
    assert [ref[i][2] for i in ids.tolist()] == y.tolist()
    assert x.dtype == torch.float32 and x.shape == (n, 3, 32, 32)
    worst = {"png": 0.0, "jpg": 0.0}
    for k, i in enumerate(ids.tolist()):
        ext, blob, _ = ref[i]
        want = torch.from_numpy(np.asarray(Image.open(io.BytesIO(blob)).convert("RGB")).copy())
        got = (x[k] * 255).round().permute(1, 2, 0)
        worst[ext] = max(worst[ext], (got - want.float()).abs().max().item())
    # PNG -> raw pixels: exact. JPEG bytes kept, but FFCV decodes with libjpeg-turbo's fast DCT
    # (PIL: the accurate one): a few levels apart. Measured: 5 levels, the same on every
    # `make test-portable` setting (libjpeg-turbo, not torch's CPU kernels).
    assert worst["png"] == 0.0
    assert worst["jpg"] <= 8.0


@needs_ffcv
def test_ranks_share_evaluation_exactly_once_and_training_in_equal_full_batches(prepared):
    from abdist.data.ffcv_backend import FFCVSplit

    ffcv_dir, _ = prepared
    threads = torch.get_num_threads()  # FFCV sets torch's count; FFCVSplit restores it
    n_test = read_manifest(ffcv_dir)["splits"]["test"]["num_samples"]  # 20: 6 + 7 + 7
    seen = []
    for rank in range(3):
        data = FFCVSplit(ffcv_dir, "test", rank=rank, world_size=3, num_workers=1)
        seen += eval_pass(data, 4)[2].tolist()
    assert sorted(seen) == list(range(n_test))

    n = read_manifest(ffcv_dir)["splits"]["train"]["num_samples"]
    ranks = [FFCVSplit(ffcv_dir, "train", rank=r, world_size=2, num_workers=1) for r in (0, 1)]
    for drop_last in (False, True):
        per_rank = []
        for data in ranks:
            g = torch.Generator().manual_seed(7)  # the same state on every rank
            batches = list(
                data.batches(8, shuffle=True, generator=g, drop_last=drop_last, with_ids=True)
            )  # 8 is the global batch: 4 per rank
            assert (
                len(batches) == data.num_batches(8, drop_last) == ranks[0].num_batches(8, drop_last)
            )
            assert all(len(y) == 4 and x.shape == (4, 3, 32, 32) for x, y, _ in batches)
            per_rank.append(torch.cat([i for _, _, i in batches]).tolist())
        ids = per_rank[0] + per_rank[1]
        if drop_last:
            assert len(ids) == 2 * 4 * (n // 8) and len(set(ids)) == len(ids)
        else:
            assert set(ids) == set(range(n)) and len(ids) - n < 2 * 4
    # Same generator state: same epoch; another state: another order.
    a = [
        i
        for _, _, i in ranks[0].batches(
            4, shuffle=True, generator=torch.Generator().manual_seed(1), with_ids=True
        )
    ]
    b = [
        i
        for _, _, i in ranks[0].batches(
            4, shuffle=True, generator=torch.Generator().manual_seed(1), with_ids=True
        )
    ]
    c = [
        i
        for _, _, i in ranks[0].batches(
            4, shuffle=True, generator=torch.Generator().manual_seed(2), with_ids=True
        )
    ]
    assert torch.equal(torch.cat(a), torch.cat(b)) and not torch.equal(torch.cat(a), torch.cat(c))
    assert torch.get_num_threads() == threads


@needs_ffcv
def test_class_aware_augmentation_follows_the_shared_table(prepared):
    from abdist.data.augment import AugmentTable, ClassAwareAugment, TrainAugment
    from abdist.data.ffcv_backend import FFCVSplit

    ffcv_dir, _ = prepared
    table = AugmentTable(4, magnitude=1.0, probability=0.0, lag=0)
    table.publish(-1)
    data = FFCVSplit(ffcv_dir, "train", num_workers=1, mean=0.0, std=1.0)
    augment = TrainAugment(ClassAwareAugment(table, ops=["brightness", "cutout"]), None, 0.0, 1.0)
    x_ref, _, ids, _ = eval_pass(data, 16)  # evaluation passes are never augmented
    ref = x_ref[torch.argsort(ids)]
    done = 0  # batches trained so far: the chain's batch numbers run on across passes

    def train_pass(seed: int):
        nonlocal done
        g = torch.Generator().manual_seed(seed)
        out = []
        for batch in data.batches(
            16, shuffle=True, generator=g, with_ids=True, augment=augment, first_batch=done
        ):
            out.append(batch)
            table.publish(done)  # as the training loop does after each batch
            done += 1
        return (
            torch.cat([x for x, _, _ in out]),
            torch.cat([y for _, y, _ in out]),
            torch.cat([i for _, _, i in out]),
        )

    x, y, i = train_pass(0)  # probability 0 everywhere: the identity
    assert torch.equal(x, ref[i])
    # Class 1 only, set between passes: labelled with the next batch (2), so with lag 0 batch 3
    # is the first to use it (abdist/data/augment_table.py).
    table.set(probability=[0.0, 1.0, 0.0, 0.0])
    x, y, i = train_pass(1)
    changed = (x - ref[i]).abs().flatten(1).amax(1) > 0
    first, later = slice(0, 16), slice(16, None)
    assert not changed[first].any()
    assert (y[later] == 1).any() and changed[later][y[later] == 1].all()
    assert not changed[later][y[later] != 1].any()


@needs_ffcv
def test_grayscale_digits_come_back_as_one_channel(tmp_path):
    from abdist.data.ffcv_backend import FFCVSplit

    for fmt in ("ffcv", "wds"):
        prepare("digits", tmp_path / fmt, PrepareOptions(format=fmt, imbalance_ratio=10.0))
    m = read_manifest(tmp_path / "ffcv")
    assert {k: m["image"][k] for k in ("channels", "size")} == {"channels": 1, "size": 8}
    data = FFCVSplit(tmp_path / "ffcv", "val", num_workers=1, mean=0.0, std=1.0)
    assert data.image_shape == (1, 8, 8)
    x, y, ids, _ = eval_pass(data, 32)
    assert x.shape == (m["splits"]["val"]["num_samples"], 1, 8, 8)
    ref = tar_samples(tmp_path / "wds", "val")
    for k, i in enumerate(ids.tolist()):
        want = np.asarray(Image.open(io.BytesIO(ref[i][1])).convert("L"))
        assert torch.equal((x[k, 0] * 255).round(), torch.from_numpy(want.astype(np.float32)))
        assert y[k].item() == ref[i][2]


@needs_ffcv
def test_verify_catches_flipped_bytes_and_strays(prepared, tmp_path):
    ffcv_dir, _ = prepared
    work = tmp_path / "copy"
    shutil.copytree(ffcv_dir, work)
    data = bytearray((work / "train.beton").read_bytes())
    data[len(data) // 2] ^= 0xFF  # inside the data pages: the file stays readable
    (work / "train.beton").write_bytes(bytes(data))
    problems = verify_shards(work)
    assert len(problems) == 1 and problems[0].startswith("train.beton: sha256 mismatch")

    data = bytearray((work / "val.beton").read_bytes())
    data[0] ^= 0xFF  # the format version in the header
    (work / "val.beton").write_bytes(bytes(data))
    shutil.copy(work / "test.beton", work / "extra.beton")
    problems = verify_shards(work)
    assert any(p.startswith("val.beton: sha256 mismatch") for p in problems)
    assert any(p.startswith("val.beton: unreadable .beton") for p in problems)
    assert "extra.beton: shard file not listed in the manifest" in problems


@needs_ffcv
def test_verify_checks_the_samples_inside_a_beton(prepared, tmp_path):
    from ffcv.reader import Reader
    from ffcv.types import HeaderType

    ffcv_dir, _ = prepared
    work = tmp_path / "copy"
    shutil.copytree(ffcv_dir, work)
    path = work / "test.beton"
    reader = Reader(str(path))
    row = reader.metadata.dtype
    old_label = int(reader.metadata[row.names[1]][0])
    at = HeaderType.itemsize + reader.field_descriptors.nbytes + row.fields[row.names[1]][1]
    data = bytearray(path.read_bytes())
    data[at : at + 8] = (99).to_bytes(8, "little")  # sample 0's label: no such class
    path.write_bytes(bytes(data))
    m = json.loads((work / "manifest.json").read_text())
    m["splits"]["test"]["shards"][0]["sha256"] = sha256_file(path)  # as if written that way
    (work / "manifest.json").write_text(json.dumps(m))
    problems = verify_shards(work)
    assert "test.beton: sample test-00000000: label is not a class index in [0, 4)" in problems
    assert f"test: class {old_label} ('c{old_label}'): 5 samples expected, 4 found" in problems


@needs_ffcv
def test_reader_refuses_webdataset_shards_and_bad_arguments(prepared):
    from abdist.data.ffcv_backend import FFCVSplit

    ffcv_dir, wds_dir = prepared
    with pytest.raises(UserError, match="not in FFCV format"):
        FFCVSplit(wds_dir, "train")
    with pytest.raises(UserError, match="rank"):
        FFCVSplit(ffcv_dir, "train", rank=2, world_size=2)
    with pytest.raises(UserError, match="no split"):
        FFCVSplit(ffcv_dir, "nope")


@needs_ffcv
def test_mixed_image_sizes_are_centre_cropped_to_image_size(tmp_path):
    from abdist.data.ffcv_backend import FFCVSplit

    for split in ("train", "test"):
        for c in range(2):
            d = tmp_path / "tree" / split / f"c{c}"
            d.mkdir(parents=True)
            for k in range(4):
                h, w = (24, 40) if k % 2 else (32, 32)
                arr = np.zeros((h, w, 3), np.uint8)
                arr[:, : w // 2] = 200  # left half bright: so is the centre square's
                Image.fromarray(arr).save(d / f"{k}.{'png' if k < 2 else 'jpg'}")
    m = prepare(str(tmp_path / "tree"), tmp_path / "out", PrepareOptions(format="ffcv"))
    assert m["image"]["size"] is None
    with pytest.raises(UserError, match="image_size"):
        FFCVSplit(tmp_path / "out", "test")
    data = FFCVSplit(tmp_path / "out", "test", image_size=16, mean=0.0, std=1.0, num_workers=1)
    x, _, _, _ = eval_pass(data, 3)
    assert x.shape == (8, 3, 16, 16)
    assert x[..., :7].amin() > 0.7 and x[..., 10:].amax() < 0.1


def _damaged_jpeg_tree(root: Path, split: str) -> str:
    """A tiny tree whose `split` holds one JPEG with an intact header and a zeroed body: the
    header reads, the pixels do not. Returns that file's key."""
    rng = np.random.default_rng(3)
    for s, n in (("train", 6), ("test", 3)):
        for c in range(2):
            d = root / s / f"c{c}"
            d.mkdir(parents=True)
            for k in range(n):
                buf = io.BytesIO()
                Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(
                    buf, format="JPEG"
                )
                data = buf.getvalue()
                if s == split and c == 1 and k == 2:
                    data = data[:200] + bytes(len(data) - 200)
                (d / f"{k}.jpg").write_bytes(data)
    return f"{split}/c1/2.jpg"


@pytest.mark.parametrize("fmt", ["wds", "ffcv"])
def test_a_jpeg_whose_pixels_do_not_decode_is_refused_or_skipped_never_used(tmp_path, fmt):
    """Among the training images prepare decodes for the pixel statistics, a damaged JPEG is one
    line naming it (either format). In the test split (only its header is read for WebDataset):
    FFCV refuses it at prepare, since its reader would decode some image from it silently; the
    WebDataset loader skips and counts it (data.bad_data=skip)."""
    from tests.conftest import run_cli

    if fmt == "ffcv" and not HAVE_FFCV:
        pytest.skip("ffcv is not installed (optional extra)")
    for split in ("train", "test"):
        key = _damaged_jpeg_tree(tmp_path / split / "tree", split)
        out = tmp_path / split / "out"
        r = run_cli("prepare", tmp_path / split / "tree", out, "--val", "0", "--format", fmt)
        if split == "train" or fmt == "ffcv":
            assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-1500:]
            assert (
                r.stderr.strip()
                .splitlines()[-1]
                .startswith(f"abdist: error: {split} sample '{key}': not a readable image")
            ), r.stderr[-600:]
            assert not out.exists()
        else:
            assert r.returncode == 0, r.stderr[-1500:]
            from abdist.data.loader import ShardSplit

            test = ShardSplit(out, "test")
            with pytest.warns(UserWarning, match="skipped bad sample"):
                n = sum(len(y) for _, y in test.batches(4, shuffle=False))
            assert n == 5 and test.bad_sample_counts["decode"] == 1


@needs_ffcv
def test_gather_serves_any_positions_in_order_through_the_training_pipeline(prepared):
    """Random access (SelMix's class-conditional draws): the samples at the given positions,
    repeats included, in that order, with their labels; without augmentation the pixels of an
    evaluation pass; with it, a function of the generator."""
    from abdist.data.augment import RandomCropFlip, TrainAugment
    from abdist.data.ffcv_backend import FFCVSplit

    split = FFCVSplit(prepared[0], "train", num_workers=1)
    pixels = torch.cat([x for x, _ in split.batches(7, shuffle=False)])
    positions = np.array([5, 0, 5, len(split) - 1, 2, 2, 9])
    got = list(split.gather(positions, 3))
    assert [len(y) for _, y in got] == [3, 3, 1]
    x, y = torch.cat([b[0] for b in got]), torch.cat([b[1] for b in got])
    assert torch.equal(y, split.labels[positions])
    assert torch.equal(x, pixels[positions])
    aug = TrainAugment(None, RandomCropFlip(2, flip=True), tuple(split.mean), tuple(split.std))
    runs = [
        torch.cat([b[0] for b in split.gather(positions, 4, augment=aug,
                                              generator=torch.Generator().manual_seed(s))])
        for s in (1, 1, 2)
    ]  # fmt: skip
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    with pytest.raises(UserError, match="positions must lie in"):
        list(split.gather([len(split)], 2))
