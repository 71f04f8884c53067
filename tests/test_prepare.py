"""`abdist prepare`: raw sources → long-tailed, split, shuffled shards + manifest.

All data is generated in tmp_path (tiny fake CIFAR pickles, PIL-made image trees, list files);
nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import io
import json
import math
import pickle
import tarfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from abdist.data import prepare as prepare_mod
from abdist.data.digits import digits_lt_indices, load_raw
from abdist.data.longtail import longtail_counts
from abdist.data.prepare import PrepareOptions, parse_val, prepare
from abdist.data.shards import verify_shards
from abdist.errors import UserError
from tests.conftest import run_cli

CIFAR_TRAIN, CIFAR_TEST = 30, 5  # per class


# --------------------------------------------------------------------------- fake data


def make_cifar10(root: Path, seed: int = 0) -> tuple[Path, dict[str, tuple[np.ndarray, list]]]:
    """A CIFAR-10-layout folder (10 classes × 30 train / 5 test, random 32×32 pixels).

    Returns the folder and, per split, the HWC images and labels as written.
    """
    rng = np.random.default_rng(seed)
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    names = [f"class{c}" for c in range(10)]
    out = {}
    for split, per_class in (("train", CIFAR_TRAIN), ("test", CIFAR_TEST)):
        labels = rng.permutation(np.repeat(np.arange(10), per_class)).tolist()
        data = rng.integers(0, 256, size=(len(labels), 3072), dtype=np.uint8)
        out[split] = (data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1), labels)
        parts = np.array_split(np.arange(len(labels)), 5) if split == "train" else [None]
        for b, sel in enumerate(parts, 1):
            sel = np.arange(len(labels)) if sel is None else sel
            d = {
                b"batch_label": b"fake",
                b"labels": [labels[i] for i in sel],
                b"data": data[sel],
                b"filenames": [f"{split}_{i}.png".encode() for i in sel],
            }
            name = f"data_batch_{b}" if split == "train" else "test_batch"
            # Protocol 2 with bytes keys and numpy 1.x's module path, like the real downloads.
            blob = pickle.dumps(d, protocol=2)
            blob = blob.replace(b"numpy._core.multiarray", b"numpy.core.multiarray")
            (folder / name).write_bytes(blob)
    meta = {b"label_names": [n.encode() for n in names], b"num_vis": 3072}
    (folder / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    return folder, out


def _jpeg(rng, size=16, mode="RGB") -> bytes:
    arr = rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).convert(mode).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _png(rng, size=16) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 256, size=(size, size, 3), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


TREE_COUNTS = {"train": {"cat": 12, "dog": 8, "eel": 6}, "test": {"cat": 3, "dog": 3, "eel": 3}}


def make_image_tree(root: Path, seed: int = 0) -> Path:
    """``root/{train,test}/{cat,dog,eel}/*.jpg`` (one PNG, plus files that must be ignored)."""
    rng = np.random.default_rng(seed)
    for split, classes in TREE_COUNTS.items():
        for cls, n in classes.items():
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                if split == "train" and cls == "dog" and i == 0:
                    (d / f"{i:03d}.png").write_bytes(_png(rng))
                else:
                    (d / f"{i:03d}.jpg").write_bytes(_jpeg(rng))
    (root / "README.txt").write_text("not an image")
    (root / "train" / "cat" / ".DS_Store").write_bytes(b"\x00junk")
    return root


def make_tar(tree: Path, dest: Path, wrap: str = "data") -> Path:
    """A .tar.gz of ``tree`` inside one wrapping folder, as ``tar czf x.tgz data/`` makes it."""
    with tarfile.open(dest, "w:gz") as tf:
        tf.add(tree, arcname=wrap)
    return dest


def shard_members(out: Path, split: str) -> list[dict[str, bytes]]:
    """All samples of ``split`` as {field: bytes} dicts (with ``__key__``), in shard order."""
    manifest = json.loads((out / "manifest.json").read_text())
    samples = []
    for shard in manifest["splits"][split]["shards"]:
        with tarfile.open(out / shard["name"]) as tf:
            for m in tf.getmembers():
                key, _, field = m.name.partition(".")
                if not samples or samples[-1]["__key__"] != key:
                    samples.append({"__key__": key})
                samples[-1][field] = tf.extractfile(m).read()
    return samples


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def shas(out: Path) -> list[str]:
    m = manifest_of(out)
    return [s["sha256"] for split in m["splits"].values() for s in split["shards"]]


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    return make_cifar10(tmp_path_factory.mktemp("raw"))


# --------------------------------------------------------------------------- CIFAR


@pytest.mark.parametrize("profile", ["exp", "step"])
def test_cifar_train_pool_follows_profile_and_val_is_carved(cifar, tmp_path, profile):
    folder, _ = cifar
    opts = PrepareOptions(profile=profile, imbalance_ratio=10, val=0.2, seed=0, shard_size=40)
    m = prepare(str(folder.parent), tmp_path / "out", opts)
    counts = longtail_counts(CIFAR_TRAIN, 10, 10, profile, 0.5)
    tr, va, te = (m["splits"][s]["class_counts"] for s in ("train", "val", "test"))
    assert [a + b for a, b in zip(tr, va)] == counts
    # stratified_split: round(n * 0.2) per class, clamped to [1, n - 1].
    assert va == [min(max(math.floor(n * 0.2 + 0.5), 1), n - 1) for n in counts]
    assert te == [CIFAR_TEST] * 10
    assert m["class_names"] == [f"class{c}" for c in range(10)]
    assert {k: m["image"][k] for k in ("channels", "size")} == {"channels": 3, "size": 32}
    assert m["source"]["kind"] == "cifar10" and m["group_names"] is None
    sizes = [s["num_samples"] for s in m["splits"]["train"]["shards"]]
    assert sum(sizes) == sum(tr) and max(sizes) <= 40 and max(sizes) - min(sizes) <= 1
    assert verify_shards(tmp_path / "out") == []


def test_cifar_shards_hold_lossless_pixels_with_their_labels(cifar, tmp_path):
    folder, raw = cifar
    prepare(str(folder), tmp_path / "out", PrepareOptions(imbalance_ratio=5, shard_size=25))
    for split, source_split in (("train", "train"), ("val", "train"), ("test", "test")):
        images, labels = raw[source_split]
        by_pixels = {
            hashlib.sha256(img.tobytes()).hexdigest(): lab for img, lab in zip(images, labels)
        }
        samples = shard_members(tmp_path / "out", split)
        assert [s["__key__"] for s in samples] == [f"{split}-{i:08d}" for i in range(len(samples))]
        for i, s in enumerate(samples):
            assert set(s) == {"__key__", "png", "cls", "idx"}
            assert s["idx"] == str(i).encode()
            pixels = np.asarray(Image.open(io.BytesIO(s["png"])))
            assert pixels.shape == (32, 32, 3)
            assert by_pixels[hashlib.sha256(pixels.tobytes()).hexdigest()] == int(s["cls"])
    # Shuffled: the first shard mixes classes rather than holding the head class only.
    first = [int(s["cls"]) for s in shard_members(tmp_path / "out", "train")[:25]]
    assert len(set(first)) >= 5


@pytest.mark.numerics
def test_manifest_pixel_statistics_are_the_training_split_s(cifar, tmp_path, monkeypatch):
    folder, _ = cifar
    m = prepare(str(folder), tmp_path / "out", PrepareOptions(imbalance_ratio=5, shard_size=25))
    train = (
        np.stack(
            [
                np.asarray(Image.open(io.BytesIO(s["png"])))
                for s in shard_members(tmp_path / "out", "train")
            ]
        ).reshape(-1, 3)
        / 255.0
    )
    np.testing.assert_allclose(m["image"]["mean"], train.mean(0), atol=1e-6)
    np.testing.assert_allclose(m["image"]["std"], train.std(0), atol=1e-6)
    # Capped at a sample: the first images written (a seeded random sample of the split).
    monkeypatch.setattr(prepare_mod, "PIXEL_STAT_IMAGES", 7)
    m = prepare(str(folder), tmp_path / "few", PrepareOptions(imbalance_ratio=5, shard_size=25))
    first = (
        np.stack(
            [
                np.asarray(Image.open(io.BytesIO(s["png"])))
                for s in shard_members(tmp_path / "few", "train")[:7]
            ]
        ).reshape(-1, 3)
        / 255.0
    )
    np.testing.assert_allclose(m["image"]["mean"], first.mean(0), atol=1e-6)


def test_val_zero_keeps_exact_longtail_counts_and_writes_no_val_shards(cifar, tmp_path):
    folder, _ = cifar
    m = prepare(str(folder), tmp_path / "o", PrepareOptions(imbalance_ratio=100, val=0))
    assert m["splits"]["train"]["class_counts"] == longtail_counts(30, 10, 100, "exp")
    assert m["splits"]["val"] == {
        "num_samples": 0,
        "class_counts": [0] * 10,
        "group_class_counts": None,
        "shards": [],
    }
    assert not list((tmp_path / "o").glob("val-*"))


@pytest.mark.parametrize("val, k", [(2, 2), (10, 2), (0.5, 2), (0.2, 1)])
def test_balanced_val_has_equal_counts(cifar, tmp_path, val, k):
    # exp, rho=10 over 30: the tail class has 3 samples, so at most 2 can go to validation.
    folder, _ = cifar
    opts = PrepareOptions(imbalance_ratio=10, val=val, val_balanced=True)
    m = prepare(str(folder), tmp_path / "o", opts)
    counts = longtail_counts(30, 10, 10, "exp")
    assert m["splits"]["val"]["class_counts"] == [k] * 10
    assert m["splits"]["train"]["class_counts"] == [n - k for n in counts]


def test_no_imbalance_ratio_keeps_the_pool(cifar, tmp_path):
    folder, _ = cifar
    m = prepare(str(folder), tmp_path / "o", PrepareOptions(val=3))
    assert m["splits"]["train"]["class_counts"] == [27] * 10
    assert m["splits"]["val"]["class_counts"] == [3] * 10


def test_determinism_and_seed(cifar, tmp_path):
    folder, _ = cifar
    opts = PrepareOptions(imbalance_ratio=10, seed=7, shard_size=30)
    a = prepare(str(folder), tmp_path / "a", opts)
    b = prepare(str(folder), tmp_path / "b", opts)
    assert a == b and shas(tmp_path / "a") == shas(tmp_path / "b")
    for f in (tmp_path / "a").iterdir():
        assert f.read_bytes() == (tmp_path / "b" / f.name).read_bytes(), f.name
    c = prepare(
        str(folder), tmp_path / "c", PrepareOptions(imbalance_ratio=10, seed=8, shard_size=30)
    )
    assert set(shas(tmp_path / "c")).isdisjoint(shas(tmp_path / "a"))
    assert c["seed"] == 8 and a["options"]["imbalance_ratio"] == 10


def test_groups_csv(cifar, tmp_path):
    folder, raw = cifar
    csv = tmp_path / "groups.csv"
    rows = ["key,group"]
    rows += [f"train/{i},{'b' if i % 3 else 'a'}" for i in range(len(raw["train"][1]))]
    # The alternative key (the pickle's file name) works as well.
    rows += [f"test_{i}.png,{'b' if i % 3 else 'a'}" for i in range(len(raw["test"][1]))]
    csv.write_text("\n".join(rows) + "\n")
    opts = PrepareOptions(imbalance_ratio=5, groups=str(csv))
    m = prepare(str(folder), tmp_path / "o", opts)
    assert m["group_names"] == ["a", "b"]
    for split in ("train", "val", "test"):
        info = m["splits"][split]
        gcc = np.array(info["group_class_counts"])
        assert gcc.shape == (2, 10)
        assert gcc.sum(0).tolist() == info["class_counts"]
        samples = shard_members(tmp_path / "o", split)
        got = np.zeros((2, 10), dtype=int)
        for s in samples:
            got[int(s["grp"]), int(s["cls"])] += 1
        assert got.tolist() == info["group_class_counts"]
    assert verify_shards(tmp_path / "o") == []
    # Both groups appear, in roughly the 1:2 proportion the CSV gives.
    assert 0 < np.array(m["splits"]["test"]["group_class_counts"])[0].sum() < 25

    csv.write_text("train/0,a\n")
    with pytest.raises(UserError, match=r"no group for \d+ train samples, e.g. 'train/"):
        prepare(str(folder), tmp_path / "p", opts)
    assert not (tmp_path / "p").exists()


def test_cifar100_fine_labels(tmp_path):
    rng = np.random.default_rng(0)
    folder = tmp_path / "cifar-100-python"
    folder.mkdir()
    for split, per in (("train", 2), ("test", 1)):
        fine = np.repeat(np.arange(100), per).tolist()
        d = {
            b"data": rng.integers(0, 256, (len(fine), 3072), dtype=np.uint8),
            b"fine_labels": fine,
            b"coarse_labels": [f // 5 for f in fine],
        }
        (folder / split).write_bytes(pickle.dumps(d, protocol=2))
    meta = {b"fine_label_names": [f"f{i}".encode() for i in range(100)], b"coarse_label_names": []}
    (folder / "meta").write_bytes(pickle.dumps(meta, protocol=2))
    m = prepare(str(tmp_path), tmp_path / "o", PrepareOptions(val=0))
    assert m["source"]["kind"] == "cifar100" and m["num_classes"] == 100
    assert m["class_names"][:2] == ["f0", "f1"]
    assert m["splits"]["train"]["class_counts"] == [2] * 100


def test_malicious_pickle_is_refused(tmp_path):
    folder, _ = make_cifar10(tmp_path)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    (folder / "test_batch").write_bytes(pickle.dumps({b"data": Evil()}))
    with pytest.raises(UserError, match="not a readable CIFAR pickle.*builtins.print"):
        prepare(str(folder), tmp_path / "o")


# --------------------------------------------------------------------------- other sources


def test_image_folder_and_its_tar_give_identical_shards(tmp_path):
    tree = make_image_tree(tmp_path / "tree")
    originals = {
        hashlib.sha256(p.read_bytes()).hexdigest()
        for p in (tree).rglob("*")
        if p.suffix in (".jpg", ".png")
    }
    opts = PrepareOptions(imbalance_ratio=2, val=1, shard_size=7, seed=3)
    m = prepare(str(tree), tmp_path / "a", opts)
    assert m["class_names"] == ["cat", "dog", "eel"]
    counts = longtail_counts(6, 3, 2, "exp")  # n_max = smallest class (eel: 6)
    assert m["splits"]["train"]["class_counts"] == [n - 1 for n in counts]
    assert m["splits"]["val"]["class_counts"] == [1, 1, 1]
    assert m["splits"]["test"]["class_counts"] == [3, 3, 3]
    assert {k: m["image"][k] for k in ("channels", "size")} == {"channels": 3, "size": 16}
    exts = set()
    for split in ("train", "val", "test"):
        for s in shard_members(tmp_path / "a", split):
            (ext,) = set(s) & {"jpg", "png"}
            exts.add(ext)
            # Stored byte for byte: no re-encoding.
            assert hashlib.sha256(s[ext]).hexdigest() in originals
    assert exts <= {"jpg", "png"} and "jpg" in exts

    tgz = make_tar(tree, tmp_path / "tree.tar.gz")
    m2 = prepare(str(tgz), tmp_path / "b", opts)
    assert m2["source"]["kind"] == "folder-tar"
    assert m2["splits"] == m["splits"] and shas(tmp_path / "b") == shas(tmp_path / "a")
    assert not list(tmp_path.glob("b.tmp-*")) and sorted(
        p.name for p in (tmp_path / "b").iterdir()
    ) == sorted(p.name for p in (tmp_path / "a").iterdir())


def test_png_named_jpg_is_stored_as_png(tmp_path):
    tree = make_image_tree(tmp_path / "tree")
    rng = np.random.default_rng(1)
    (tree / "test" / "cat" / "zzz.jpg").write_bytes(_png(rng))  # ImageNet has a few of these
    prepare(str(tree), tmp_path / "o", PrepareOptions(val=0))
    pngs = [s for s in shard_members(tmp_path / "o", "test") if "png" in s]
    assert len(pngs) == 1 and pngs[0]["png"].startswith(b"\x89PNG")


def test_list_files_with_group_column_and_own_val(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    (root / "a").mkdir(parents=True)
    lines = {"train": [], "val": [], "test": []}
    per_class = {"train": [9, 5, 2], "val": [2, 2, 2], "test": [2, 2, 2]}
    for split, counts in per_class.items():
        for c, n in enumerate(counts):
            for i in range(n):
                rel = f"a/{split}_{c}_{i}.jpg"
                (root / rel).write_bytes(_jpeg(rng, size=8, mode="L"))
                lines[split].append(f"{rel} {c} {'m' if i % 2 else 'f'}")
    lists = {}
    for split, ls in lines.items():
        lists[split] = str(tmp_path / f"{split}.txt")
        Path(lists[split]).write_text("# path label group\n" + "\n".join(ls) + "\n")
    m = prepare("list", tmp_path / "o", PrepareOptions(), lists=lists, root=str(root))
    assert m["source"]["kind"] == "list" and m["class_names"] == ["0", "1", "2"]
    for split, counts in per_class.items():
        assert m["splits"][split]["class_counts"] == counts
    assert m["group_names"] == ["f", "m"]
    assert m["splits"]["train"]["group_class_counts"] == [[5, 3, 1], [4, 2, 1]]
    assert {k: m["image"][k] for k in ("channels", "size")} == {"channels": 1, "size": 8}
    assert verify_shards(tmp_path / "o") == []
    # The source has its own val: carving options would be silently meaningless, so refuse them.
    with pytest.raises(UserError, match="own val split"):
        prepare("list", tmp_path / "p", PrepareOptions(val=0.1), lists=lists, root=str(root))
    # A long tail over list files subsamples train only.
    m = prepare(
        "list", tmp_path / "q", PrepareOptions(imbalance_ratio=2), lists=lists, root=str(root)
    )
    assert m["splits"]["train"]["class_counts"] == longtail_counts(2, 3, 2, "exp")
    assert m["splits"]["test"]["class_counts"] == per_class["test"]


def test_inat_json(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "inat"
    cats = [{"id": 40, "name": "Aves"}, {"id": 7, "name": "Plantae"}]
    docs = {}
    next_id = 100
    for split, per in (("train", {7: 6, 40: 3}), ("test", {7: 2, 40: 2})):
        images, anns = [], []
        for cid, n in per.items():
            for _ in range(n):
                rel = f"{split}_val2018/{cid}/{next_id}.jpg"
                (root / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / rel).write_bytes(_jpeg(rng))
                images.append({"id": next_id, "file_name": rel})
                anns.append({"image_id": next_id, "category_id": cid})
                next_id += 1
        path = tmp_path / f"{split}2018.json"
        path.write_text(json.dumps({"images": images, "annotations": anns, "categories": cats}))
        docs[split] = str(path)
    m = prepare("inat", tmp_path / "o", PrepareOptions(val=1), jsons=docs, root=str(root))
    assert m["class_names"] == ["Plantae", "Aves"]  # ordered by category id
    assert m["splits"]["train"]["class_counts"] == [5, 2]
    assert m["splits"]["val"]["class_counts"] == [1, 1]
    assert m["splits"]["test"]["class_counts"] == [2, 2]


def test_digits_matches_in_memory_split(tmp_path):
    m = prepare("digits", tmp_path / "o", PrepareOptions(imbalance_ratio=10, seed=3))
    idx = digits_lt_indices(imbalance_ratio=10.0, seed=3)
    raw, labels = load_raw()
    assert {k: m["image"][k] for k in ("channels", "size")} == {"channels": 1, "size": 8}
    for split in ("train", "val", "test"):
        want = sorted((int(labels[i]), tuple(raw[i].astype(int))) for i in idx[split])
        got = []
        for s in shard_members(tmp_path / "o", split):
            pixels = np.asarray(Image.open(io.BytesIO(s["png"]))).astype(int)
            assert (pixels % 15 == 0).all()  # stored as 15 * v: exactly invertible
            got.append((int(s["cls"]), tuple((pixels // 15).ravel())))
        assert sorted(got) == want, split


# --------------------------------------------------------------------------- safety


class _Boom(Exception):
    pass


@pytest.mark.parametrize("exc", [_Boom, KeyboardInterrupt])
def test_interrupted_prepare_leaves_no_out(cifar, tmp_path, monkeypatch, exc):
    folder, _ = cifar
    real = prepare_mod.encode_image
    calls = []

    def flaky(payload, where="image"):
        calls.append(1)
        if len(calls) == 60:  # mid-way: some shards are already on disk
            raise exc()
        return real(payload, where)

    monkeypatch.setattr(prepare_mod, "encode_image", flaky)
    with pytest.raises(exc):
        prepare(str(folder), tmp_path / "out", PrepareOptions(shard_size=20))
    assert len(calls) == 60
    assert list(tmp_path.iterdir()) == []  # neither out nor out.tmp-<pid>


def test_existing_out_needs_force(cifar, tmp_path):
    folder, _ = cifar
    out = tmp_path / "out"
    prepare(str(folder), out, PrepareOptions(seed=1))
    with pytest.raises(UserError, match="already exists; pass --force"):
        prepare(str(folder), out, PrepareOptions(seed=2))
    assert manifest_of(out)["seed"] == 1
    prepare(str(folder), out, PrepareOptions(seed=2), force=True)
    assert manifest_of(out)["seed"] == 2 and verify_shards(out) == []
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    # --force never deletes a directory that is not prepare output.
    other = tmp_path / "precious"
    other.mkdir()
    (other / "thesis.tex").write_text("x")
    with pytest.raises(UserError, match="refusing to replace"):
        prepare(str(folder), other, force=True)
    assert (other / "thesis.tex").read_text() == "x"


@pytest.mark.parametrize(
    "source, kwargs, match",
    [
        ("nope", {}, "not found"),
        ("list", {}, "needs --list"),
        ("list", {"lists": {"train": "x.txt"}, "root": "."}, "missing --list test=FILE"),
        ("inat", {"jsons": {"train": "a", "test": "b"}}, "needs --root"),
    ],
)
def test_bad_sources_are_one_line_errors(tmp_path, source, kwargs, match):
    with pytest.raises(UserError, match=match) as err:
        prepare(source, tmp_path / "o", **kwargs)
    assert "\n" not in str(err.value) and not (tmp_path / "o").exists()


def test_bad_options(tmp_path):
    assert parse_val("0.2") == 0.2 and parse_val("20") == 20 and parse_val("0") == 0
    for text in ("1.5", "-3", "abc"):
        with pytest.raises(UserError):
            parse_val(text)
    for opts in (
        PrepareOptions(imbalance_ratio=0.5),
        PrepareOptions(profile="linear"),
        PrepareOptions(shard_size=0),
        PrepareOptions(format="parquet"),
        PrepareOptions(n_max=10),
    ):
        with pytest.raises(UserError):
            prepare("digits", tmp_path / "o", opts)
    assert list(tmp_path.iterdir()) == []


# --------------------------------------------------------------------------- CLI


def test_cli_prepare_and_verify(cifar, tmp_path):
    folder, _ = cifar
    out = tmp_path / "shards"
    args = ["prepare", folder, out, "--imbalance-ratio", "10", "--val", "0.2", "--seed", "1"]
    r = run_cli(*args, "--shard-size", "50")
    assert r.returncode == 0, r.stderr
    assert r.stdout.startswith(f"wrote {out}: 10 classes, train ")
    m = manifest_of(out)
    assert m["options"]["val"] == 0.2 and m["options"]["shard_size"] == 50
    assert m["splits"]["train"]["class_counts"][0] == 24  # 30 minus round(30 * 0.2) for val

    r = run_cli("verify", out)
    n = sum(len(s["shards"]) for s in m["splits"].values())
    total = sum(s["num_samples"] for s in m["splits"].values())
    assert r.returncode == 0 and r.stdout.strip() == f"ok: {n} shards, {total} samples"

    r = run_cli(*args)  # OUT exists
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert "--force" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("prepare", folder, tmp_path / "x", "--val", "1.5")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "x").exists()


# --------------------------------------------------------------------------- empty classes


def assert_refused(r, out: Path, *facts: str) -> str:
    """Exit 2 with one ``abdist: error:`` line naming ``facts``; neither OUT nor OUT.tmp-* left."""
    assert r.returncode == 2, (r.stdout, r.stderr)
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("abdist: error: "), r.stderr
    assert "Traceback" not in r.stderr and r.stdout == ""
    for fact in facts:
        assert fact in lines[0], (fact, lines[0])
    assert not list(out.parent.glob(out.name + "*")), list(out.parent.iterdir())
    return lines[0]


def make_lists(tmp_path: Path, labels: dict[str, list[int]]) -> tuple[list[str], dict[str, Path]]:
    """Tiny grayscale JPEGs under ``tmp_path/imgs`` and one list file per split of ``labels``."""
    rng = np.random.default_rng(0)
    root = tmp_path / "imgs"
    root.mkdir()
    files = {}
    for split, labs in labels.items():
        lines = ["# path label"]
        for i, c in enumerate(labs):
            (root / f"{split}_{i}.jpg").write_bytes(_jpeg(rng, size=8, mode="L"))
            lines.append(f"{split}_{i}.jpg {c}")
        files[split] = tmp_path / f"{split}.txt"
        files[split].write_text("\n".join(lines) + "\n")
    args = [f"--list={s}={f}" for s, f in files.items()]
    return [*args, "--root", str(root)], files


def test_list_label_past_the_classes_is_refused_with_its_line(tmp_path):
    # Ten classes 0..9, and a stray 12 on line 42 of train.txt (line 1 is a comment): C = 13
    # leaves classes 10 and 11 without training samples.
    train = [c for c in range(10) for _ in range(4)]
    train.insert(40, 12)
    args, files = make_lists(tmp_path, {"train": train, "test": list(range(10))})
    out = tmp_path / "o"
    r = run_cli("prepare", "list", out, *args, "--val", "1")
    line = assert_refused(r, out, "no training samples for 2 of 13 classes (10, 11)")
    assert f"label 12 at {files['train']}:42 makes 13" in line and "--allow-empty-classes" in line


@pytest.mark.parametrize("kind, test_images", [("folder", True), ("folder", False), ("tar", True)])
def test_empty_image_folder_class_is_refused(tmp_path, kind, test_images):
    tree = make_image_tree(tmp_path / "tree")
    (tree / "train" / "fox").mkdir()  # a class folder with nothing in it
    (tree / "test" / "fox").mkdir()
    if test_images:
        (tree / "test" / "fox" / "0.jpg").write_bytes(_jpeg(np.random.default_rng(1)))
    src = tree if kind == "folder" else make_tar(tree, tmp_path / "tree.tar.gz")
    out = tmp_path / "o"
    r = run_cli("prepare", src, out)
    assert_refused(r, out, "no training samples for 1 of 4 classes ('fox')", "train/<class>/")


def test_val_without_a_tail_class_is_refused(cifar, tmp_path):
    # exp, rho = 30 over 30: classes 8 and 9 keep a single sample, which stays in train.
    folder, _ = cifar
    out = tmp_path / "o"
    r = run_cli("prepare", folder, out, "--imbalance-ratio", "30", "--val", "0.2")
    assert_refused(
        r,
        out,
        "no validation samples for 2 of 10 classes ('class8', 'class9')",
        "--val 0",
        "--allow-empty-classes",
    )
    # A val split the source brings along is checked the same way.
    args, _ = make_lists(tmp_path, {"train": [0, 0, 1, 1], "val": [0, 0], "test": [0, 1]})
    r = run_cli("prepare", "list", out, *args)
    assert_refused(r, out, "no validation samples for 1 of 2 classes (1)", "--val N")


def test_allow_empty_classes_writes_valid_output_with_one_warning(cifar, tmp_path):
    folder, _ = cifar
    out = tmp_path / "o"
    args = ["prepare", folder, out, "--imbalance-ratio", "30", "--val", "0.2"]
    r = run_cli(*args, "--allow-empty-classes")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == (
        "abdist: warning: classes without samples: val 2 of 10 classes ('class8', 'class9'), "
        "kept (--allow-empty-classes)"
    )
    m = manifest_of(out)
    assert m["splits"]["val"]["class_counts"][8:] == [0, 0]
    assert m["splits"]["train"]["class_counts"][8:] == [1, 1]
    assert verify_shards(out) == [] and sorted(p.name for p in tmp_path.iterdir()) == ["o"]

    # An empty training class too, except where a long tail needs every class.
    tree = make_image_tree(tmp_path / "tree")
    (tree / "train" / "fox").mkdir()
    r = run_cli("prepare", tree, tmp_path / "t", "--val", "1", "--allow-empty-classes")
    assert r.returncode == 0, r.stderr
    assert len(r.stderr.strip().splitlines()) == 1
    assert "train 1 of 4 classes ('fox'); val 1 of 4 classes ('fox'); test 1 of 4" in r.stderr
    assert manifest_of(tmp_path / "t")["splits"]["train"]["class_counts"] == [11, 7, 5, 0]
    r = run_cli("prepare", tree, tmp_path / "u", "--imbalance-ratio", "2", "--allow-empty-classes")
    assert_refused(r, tmp_path / "u", "('fox')", "--imbalance-ratio needs every class")


def test_class_missing_from_test_is_a_warning(tmp_path):
    tree = make_image_tree(tmp_path / "tree")
    for p in (tree / "test" / "eel").iterdir():
        p.unlink()
    r = run_cli("prepare", tree, tmp_path / "o", "--val", "1")
    assert r.returncode == 0, r.stderr
    assert r.stderr.strip() == (
        "abdist: warning: classes without samples: test 1 of 3 classes ('eel')"
    )
    assert manifest_of(tmp_path / "o")["splits"]["test"]["class_counts"] == [3, 3, 0]


def test_json_category_without_training_images_is_refused(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "inat"
    root.mkdir()
    cats = [{"id": 7, "name": "Plantae"}, {"id": 9, "name": "Fungi"}, {"id": 40, "name": "Aves"}]
    docs = {}
    for split, per in (("train", {7: 3, 40: 3}), ("test", {7: 1, 9: 1, 40: 1})):
        images, anns = [], []
        for cid, n in per.items():
            for i in range(n):
                rel = f"{split}_{cid}_{i}.jpg"
                (root / rel).write_bytes(_jpeg(rng, size=8))
                images.append({"id": len(anns), "file_name": rel})
                anns.append({"image_id": len(anns), "category_id": cid})
        docs[split] = str(tmp_path / f"{split}.json")
        Path(docs[split]).write_text(
            json.dumps({"images": images, "annotations": anns, "categories": cats})
        )
    with pytest.raises(UserError, match=r"1 of 3 classes \('Fungi'\); every category") as err:
        prepare("inat", tmp_path / "o", PrepareOptions(val=1), jsons=docs, root=str(root))
    assert "\n" not in str(err.value) and not list(tmp_path.glob("o*"))
