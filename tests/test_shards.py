"""Shard format, writer determinism, manifest reading and `abdist verify`."""

from __future__ import annotations

import json
import shutil
import tarfile

import numpy as np
import pytest

from abdist.data.manifest import read_manifest, sha256_file
from abdist.data.prepare import PrepareOptions, prepare
from abdist.data.records import Record
from abdist.data.shards import (
    SHARD_MTIME,
    shard_sizes,
    verify_shards,
    write_wds_split,
)
from abdist.errors import UserError
from tests.conftest import run_cli
from tests.test_prepare import make_cifar10


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Digits-LT shards with a group attribute, prepared once; tests mutate copies."""
    base = tmp_path_factory.mktemp("shards")
    csv = base / "groups.csv"
    csv.write_text("".join(f"{i},{'odd' if i % 2 else 'even'}\n" for i in range(1797)))
    opts = PrepareOptions(imbalance_ratio=10, shard_size=150, groups=str(csv), seed=5)
    prepare("digits", base / "ref", opts)
    return base / "ref"


@pytest.fixture
def shards(prepared, tmp_path):
    shutil.copytree(prepared, tmp_path / "d")
    return tmp_path / "d"


def _manifest(d):
    return json.loads((d / "manifest.json").read_text())


def test_shard_sizes_are_even_and_bounded():
    assert shard_sizes(0, 10) == []
    assert shard_sizes(10, 10) == [10]
    assert shard_sizes(11, 10) == [6, 5]
    assert shard_sizes(403, 150) == [135, 134, 134]
    for n in (1, 99, 1000, 1001):
        sizes = shard_sizes(n, 100)
        assert sum(sizes) == n and max(sizes) <= 100 and max(sizes) - min(sizes) <= 1


def test_writer_is_byte_deterministic_with_fixed_member_metadata(tmp_path):
    recs = [Record(i, "png", bytes([i]) * 10, i % 3, None) for i in range(7)]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    a = write_wds_split(tmp_path / "a", "train", iter(recs), 7, 4)
    b = write_wds_split(tmp_path / "b", "train", iter(recs), 7, 4)
    assert a == b and [s["num_samples"] for s in a] == [4, 3]
    assert [s["name"] for s in a] == ["train-000000.tar", "train-000001.tar"]
    assert a[0]["sha256"] == sha256_file(tmp_path / "a" / "train-000000.tar")
    with tarfile.open(tmp_path / "a" / "train-000000.tar") as tf:
        members = tf.getmembers()
    assert [m.name for m in members[:3]] == ["train-00000000.cls", "train-00000000.idx",
                                             "train-00000000.png"]  # fmt: skip
    assert {(m.mtime, m.uid, m.gid, m.mode) for m in members} == {(SHARD_MTIME, 0, 0, 0o444)}


def test_webdataset_reads_the_exact_sample_format(prepared):
    import webdataset as wds

    m = _manifest(prepared)
    urls = [str(prepared / s["name"]) for s in m["splits"]["train"]["shards"]]
    samples = list(wds.WebDataset(urls, shardshuffle=False, empty_check=False))
    assert len(samples) == m["splits"]["train"]["num_samples"]
    counts = np.zeros(10, dtype=int)
    for i, s in enumerate(samples):
        assert s["__key__"] == f"train-{i:08d}"
        assert {k for k in s if not k.startswith("__")} == {"png", "cls", "idx", "grp"}
        assert s["idx"] == str(i).encode() and s["grp"] in (b"0", b"1")
        counts[int(s["cls"])] += 1
    assert counts.tolist() == m["splits"]["train"]["class_counts"]
    assert m["group_names"] == ["even", "odd"]


def test_verify_ok(prepared):
    assert verify_shards(prepared) == []


def test_flipped_byte_is_caught(shards):
    name = "train-000001.tar"
    with tarfile.open(shards / name) as tf:
        png = next(m for m in tf.getmembers() if m.name.endswith(".png"))
    data = bytearray((shards / name).read_bytes())
    data[png.offset_data + 30] ^= 0xFF  # inside an image: the tar stays readable
    (shards / name).write_bytes(bytes(data))
    problems = verify_shards(shards)
    assert problems and all(p.startswith(name) for p in problems)
    assert problems == [problems[0]]  # counts are intact: only the checksum differs
    assert "sha256 mismatch" in problems[0] and "expected" in problems[0]


def test_corrupt_header_is_caught(shards):
    name = "test-000000.tar"
    data = bytearray((shards / name).read_bytes())
    data[512 * 20 + 10] ^= 0xFF  # a member name inside a header: checksum no longer matches
    (shards / name).write_bytes(bytes(data))
    problems = verify_shards(shards)
    assert any(name in p and "sha256" in p for p in problems)
    assert any(name in p and ("samples expected" in p or "unreadable" in p) for p in problems)


def test_missing_and_unlisted_shards(shards):
    (shards / "val-000000.tar").rename(shards / "val-000099.tar")
    problems = verify_shards(shards)
    assert any(p.startswith("val-000000.tar: missing") for p in problems)
    assert any(p.startswith("val-000099.tar: shard file not listed") for p in problems)


def test_manifest_counts_are_checked_against_cls(shards):
    m = _manifest(shards)
    m["splits"]["train"]["class_counts"][3] += 1
    m["splits"]["train"]["num_samples"] += 1
    (shards / "manifest.json").write_text(json.dumps(m))
    problems = verify_shards(shards)
    assert any("train: class 3 ('3'): " in p and "expected" in p for p in problems)
    assert any("train: manifest says" in p for p in problems)


def test_read_manifest_errors_are_one_line(tmp_path):
    with pytest.raises(UserError, match="not found"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text("{not json")
    with pytest.raises(UserError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other/9"}))
    with pytest.raises(UserError, match="invalid manifest: format") as err:
        verify_shards(tmp_path)
    assert "\n" not in str(err.value)


def test_cli_verify_reports_problems(shards, tmp_path):
    r = run_cli("verify", shards)
    assert r.returncode == 0 and r.stdout.startswith("ok: ")
    name = "train-000000.tar"
    data = bytearray((shards / name).read_bytes())
    data[-20000] ^= 0x01
    (shards / name).write_bytes(bytes(data))
    (shards / "val-000000.tar").unlink()
    r = run_cli("verify", shards)
    assert r.returncode == 1
    assert f"{name}: sha256 mismatch" in r.stderr and "val-000000.tar: missing" in r.stderr
    assert "Traceback" not in r.stderr
    r = run_cli("verify", tmp_path / "nowhere")
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1


def test_groups_on_cifar_shards_verify(tmp_path):
    folder, raw = make_cifar10(tmp_path / "raw")
    csv = tmp_path / "g.csv"
    keys = [f"train/{i}" for i in range(300)] + [f"test/{i}" for i in range(50)]
    csv.write_text("".join(f"{k},{i % 3}\n" for i, k in enumerate(keys)))
    prepare(str(folder), tmp_path / "o", PrepareOptions(groups=str(csv), shard_size=64))
    m = _manifest(tmp_path / "o")
    assert m["group_names"] == ["0", "1", "2"]
    assert verify_shards(tmp_path / "o") == []
    # A grp field that disagrees with the manifest's table is reported.
    m["splits"]["test"]["group_class_counts"][0][0] += 1
    m["splits"]["test"]["group_class_counts"][1][0] -= 1
    (tmp_path / "o" / "manifest.json").write_text(json.dumps(m))
    assert verify_shards(tmp_path / "o") == ["test: group_class_counts differ from the grp fields"]
