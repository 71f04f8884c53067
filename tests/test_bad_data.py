"""`abdist train` on damaged shards, in memory (the default) and streamed: one line, nothing lost.

Each test damages a copy of tiny digits shards (made once with `abdist prepare`), runs the real
CLI, and checks the exit code, that stderr is the one `abdist: error: ...` line (no traceback),
that the run directory holds no results (no metrics, checkpoints or log records) and that the
shards were not touched. Bad samples (an image that does not decode) follow data.bad_data the
same way in both modes; damaged files (changed bytes, cut off, missing) always stop the run; more
skipped samples than data.max_bad_fraction of a split stop it too.
"""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import io
import json
import shutil
import tarfile
import warnings
from pathlib import Path

import pytest

from abdist.data.prepare import PrepareOptions, prepare
from abdist.data.shards import verify_shards
from abdist.errors import UserError
from tests.conftest import REPO, run_cli

CE = REPO / "configs/digits_lt/ce.yaml"
QUICK = ["data.source=shards", "train.epochs=1", "optim.warmup_epochs=0", "train.threads=1",
         "tracking.progress=never"]  # fmt: skip
MODES = {
    "memory": [],  # data.in_memory=true, the default
    "streamed": ["data.in_memory=false", "data.workers=0"],
}
SHARD = "train-000002.tar"  # the one a test damages (train has 5 shards of ~80 samples)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    root = tmp_path_factory.mktemp("bad") / "digits"
    prepare("digits", root, PrepareOptions(imbalance_ratio=10.0, seed=0, shard_size=100))
    return root


@pytest.fixture
def shards(pristine, tmp_path):
    root = tmp_path / "shards"
    shutil.copytree(pristine, root)
    for path in root.iterdir():
        path.chmod(0o644)
    return root


def _digests(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def _train(root: Path, out: Path, *over: str):
    before = _digests(root)
    r = run_cli("train", CE, "--out", out, *QUICK, f"data.root={root}", *over)
    assert _digests(root) == before  # the data is only read
    return r


def _one_line_error(r, *needles: str, warned: bool = False) -> str:
    """The run failed with exit code 2 and one `abdist: error:` line on stderr, no traceback;
    ``warned``: the skipped bad samples' warnings (a line and its source line each) before it."""
    assert r.returncode == 2, (r.returncode, r.stderr[-2000:])
    lines = r.stderr.strip().splitlines()
    if warned:
        assert "BadSampleWarning: skipped bad sample" in r.stderr
        lines = [x for x in lines if "BadSampleWarning: skipped bad" not in x and x[:2] != "  "]
    assert "Traceback" not in r.stderr and len(lines) == 1, r.stderr[-2000:]
    assert lines[0].startswith("abdist: error: ")
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])
    return lines[0]


def _nothing_written(out: Path) -> None:
    assert not (out / "metrics.json").exists() and not (out / "alpha.json").exists()
    assert not list((out / "checkpoints").glob("*")) if (out / "checkpoints").exists() else True
    log = out / "log.jsonl"
    assert not log.exists() or not log.read_text().strip()


def _log(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def _garble(root: Path, name: str, positions) -> list[str]:
    """Replace the images of the samples at ``positions`` of shard ``name`` by bytes that are no
    image, keeping a valid tar, and record the new sha256: damage `abdist verify` cannot see."""
    path = root / name
    with tarfile.open(path) as tf:
        members = [(m, tf.extractfile(m).read()) for m in tf if m.isfile()]
    keys = list(dict.fromkeys(m.name.split(".")[0] for m, _ in members))
    bad = {keys[p] for p in positions}
    with tarfile.open(path, "w", format=tarfile.USTAR_FORMAT) as out:
        for m, data in members:
            if m.name.split(".")[0] in bad and m.name.endswith((".png", ".jpg")):
                data = b"this is not an image"
            info = copy.copy(m)
            info.size = len(data)
            out.addfile(info, io.BytesIO(data))
    manifest = json.loads((root / "manifest.json").read_text())
    for entry in (e for s in manifest["splits"].values() for e in s["shards"]):
        if entry["name"] == name:
            entry["sha256"] = hashlib.sha256(path.read_bytes()).hexdigest()
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert verify_shards(root) == []  # the tar and the counts are intact: `verify` passes
    return sorted(bad)


# --- damaged files: always an error, whatever data.bad_data says --------------------------------


@pytest.mark.parametrize("bad_data", ["skip", "error"])
@pytest.mark.parametrize("mode", MODES)
def test_byte_flipped_in_a_tar_header(shards, tmp_path, mode, bad_data):
    path = shards / SHARD
    data = bytearray(path.read_bytes())
    offset = [m.offset for m in tarfile.open(path) if m.isfile()][3 * 40]  # sample 40's header
    data[offset + 10] ^= 0xFF
    path.write_bytes(bytes(data))
    over = [*MODES[mode], f"data.bad_data={bad_data}"]
    if mode == "streamed":
        over.append("data.workers=2")  # reported across the worker processes, too
    r = _train(shards, tmp_path / "run", *over)
    what = "its sha256 is" if mode == "memory" else "tar header checksum mismatch"
    _one_line_error(r, f"{SHARD} is damaged: {what}", "abdist prepare", "abdist verify")
    _nothing_written(tmp_path / "run")


@pytest.mark.parametrize("cut", ["odd", "blocks"])
@pytest.mark.parametrize("mode", MODES)
def test_truncated_shard(shards, tmp_path, mode, cut):
    path = shards / SHARD
    data = path.read_bytes()
    size = len(data) // 2 | 1 if cut == "odd" else len(data) // 2 // 512 * 512
    path.write_bytes(data[:size])
    r = _train(shards, tmp_path / "run", *MODES[mode])
    # Both modes stat every shard first; whole blocks pass that, then the sha256 (memory) or
    # the tar structure (streamed: no end-of-archive marker, or a member cut short) tells.
    what = {
        "odd": "not a whole number of 512-byte tar blocks",
        "blocks": "its sha256 is" if mode == "memory" else "truncated",
    }[cut]
    _one_line_error(r, f"{SHARD} is damaged: ", what, "abdist prepare")
    _nothing_written(tmp_path / "run")


@pytest.mark.parametrize("mode", MODES)
def test_shard_file_deleted(shards, tmp_path, mode):
    (shards / "test-000003.tar").unlink()  # found before anything is decoded or trained
    r = _train(shards, tmp_path / "run", *MODES[mode])
    _one_line_error(r, "test-000003.tar listed in the manifest is missing", "abdist prepare")
    _nothing_written(tmp_path / "run")


@pytest.mark.parametrize("mode", MODES)
def test_damaged_ffcv_directory(tmp_path, mode):
    # What `abdist prepare --format ffcv` writes, by hand (the ffcv extra is slow to write and
    # optional): one {split}.beton per split, and options.format in the manifest -- but each
    # .beton is zeros. abdist train picks the FFCV reader from the manifest in either mode.
    root = tmp_path / "ffcv"
    prepare("digits", root, PrepareOptions(imbalance_ratio=10.0, seed=0))
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["options"]["format"] = "ffcv"
    for split, info in manifest["splits"].items():
        for entry in info["shards"]:
            (root / entry["name"]).unlink()
        (root / f"{split}.beton").write_bytes(b"\0" * 1024)
        info["shards"] = [
            {"name": f"{split}.beton", "num_samples": info["num_samples"], "sha256": "0" * 64}
        ]
    (root / "manifest.json").write_text(json.dumps(manifest))
    r = _train(root, tmp_path / "run", *MODES[mode])
    if importlib.util.find_spec("ffcv") is None:
        _one_line_error(r, "needs ffcv")
    else:
        _one_line_error(r, "train.beton: not a readable .beton", "abdist verify")
    _nothing_written(tmp_path / "run")


# --- bad samples: one policy, data.bad_data, in both modes --------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_garbage_image_bytes_error_names_shard_and_key(shards, tmp_path, mode):
    (key,) = _garble(shards, SHARD, [17])
    r = _train(shards, tmp_path / "run", *MODES[mode], "data.bad_data=error")
    _one_line_error(r, f"bad sample '{key}' in shard ", SHARD, "image does not decode")
    _nothing_written(tmp_path / "run")


def test_garbage_image_bytes_are_skipped_and_counted_alike_in_both_modes(shards, tmp_path):
    _garble(shards, SHARD, [17])
    logs = {}
    for mode in MODES:
        out = tmp_path / mode
        r = _train(shards, out, *MODES[mode], "train.epochs=2")  # data.bad_data=skip: default
        assert r.returncode == 0, r.stderr[-2000:]
        assert "skipped bad sample" in r.stderr and SHARD in r.stderr
        metrics = json.loads((out / "metrics.json").read_text())
        assert metrics["bad_samples"] == 0  # none in the test split
        logs[mode] = [rec["bad_samples"] for rec in _log(out)]
    assert logs["memory"] == logs["streamed"] == [1, 1]  # once per epoch's training pass


# --- data.max_bad_fraction ----------------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
def test_max_bad_fraction_stops_a_mostly_broken_split(shards, tmp_path, mode):
    manifest = json.loads((shards / "manifest.json").read_text())
    n = manifest["splits"]["train"]["num_samples"]
    bad = 0
    for entry in manifest["splits"]["train"]["shards"][:3]:
        bad += len(_garble(shards, entry["name"], range(0, entry["num_samples"], 3)))
    r = _train(shards, tmp_path / "run", *MODES[mode])  # default limit: 0.01
    line = _one_line_error(
        r,
        f"of {n} samples of split 'train' are unreadable",
        "data.max_bad_fraction=0.01",
        warned=True,
    )
    # In memory the whole split was read: the exact count. Streamed stops at once.
    assert (f": {bad} of {n}" in line) if mode == "memory" else (": at least " in line)
    _nothing_written(tmp_path / "run")
    # Allowed: the rest trains, and both modes count the same skips.
    ok = _train(shards, tmp_path / "ok", *MODES[mode], "data.max_bad_fraction=0.5")
    assert ok.returncode == 0, ok.stderr[-2000:]
    assert [rec["bad_samples"] for rec in _log(tmp_path / "ok")] == [bad]


def test_max_bad_fraction_zero_allows_no_skip_in_memory(shards):
    from abdist.data.samples import BadSampleWarning
    from abdist.data.shard_memory import load_shards_in_memory

    _garble(shards, SHARD, [5])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", BadSampleWarning)
        with pytest.raises(UserError, match=r"1 of \d+ samples of split 'train' are unreadable"):
            load_shards_in_memory(shards, max_bad_fraction=0)
        data = load_shards_in_memory(shards, max_bad_fraction=0.01)
    assert data.bad_sample_counts == {"decode": 0, "label": 0, "missing": 0, "total": 0}
    list(data.train.batches(64, shuffle=True))  # a full pass counts the skipped sample
    list(data.train.batches(64, shuffle=True, max_batches=1))  # a partial one does not
    assert data.bad_sample_counts["decode"] == 1
    merged = data.with_val_merged()  # the retrain's train+val keeps the count
    list(merged.train.shard(1, 2).batches(64, shuffle=False))  # every rank holds all: rank 0
    assert merged.bad_sample_counts["total"] == 1  # counts it
    list(merged.train.shard(0, 2).batches(64, shuffle=False))
    assert merged.bad_sample_counts["total"] == 2
