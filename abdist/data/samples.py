"""Sample decoding and the bad-data rules: the one place both shard readers (streamed and in
memory) learn what a well-formed sample is, how an image is decoded, and what a bad sample costs.

A *bad sample* -- its image does not decode, its ``cls`` (or ``grp``) is not an integer in range,
or it lacks a member (image, ``cls``, ``idx``) -- is skipped and counted under
``data.bad_data=skip`` or is a one-line error under ``error``; ``data.max_bad_fraction`` bounds
the skipping. A damaged shard (its bytes are not what the manifest describes) is never a bad
sample: see abdist/data/manifest.py.

Images (the streamed reader, ``ShardSplit``)
    Decoded with ``torchvision.io.decode_image`` (libjpeg-turbo / libpng; about 3x faster than
    PIL on 32x32 JPEGs here), falling back to PIL for other formats and when torchvision drops
    these decoders (deprecated since 0.29 in favour of TorchCodec); ``decoder="pil"`` uses PIL
    only. Then converted to the manifest's channel count, and resized (shorter side) + centre
    cropped to ``image_size`` when a file's size differs. Transforms see float32 ``[B, C, H, W]``
    in ``[0, 1]``: training applies ``augment(x, y, generator)`` (e.g. a
    :class:`~abdist.data.augment.ClassAwareAugment`), evaluation ``eval_transform(x)``, both in
    the worker on whole batches. Then ``x = (x - mean[c]) / std[c]``, with ``mean``/``std`` from
    the constructor, else the manifest's ``image.mean`` / ``image.std`` if it has them (per
    channel, on the [0, 1] scale, meant to be the training split's statistics; ``abdist prepare``
    does not write them yet), else 0.5 / 0.5, which maps [0, 1] to [-1, 1]. Fixed values rather
    than statistics computed here: every rank and every run must normalise identically, and a
    pass over the data at start-up would cost an epoch of decoding.

Bad samples
    A *bad sample* -- its image does not decode, its ``cls`` (or ``grp``) is not an integer in
    range, or it lacks a member (image, ``cls``, ``idx``) -- is handled by ``bad_data``, exactly
    as the in-memory loader (:mod:`abdist.data.shard_memory`) handles it: ``"skip"`` (default)
    leaves it out, counts it in :attr:`ShardSplit.bad_sample_counts` and warns
    (:class:`BadSampleWarning`) naming the shard and the key; ``"error"`` raises a one-line
    :class:`~abdist.errors.UserError` with that location. Workers report bad samples *with the
    batches they send*, so counting happens in the training process: no lost updates between
    workers, counts that match what was consumed, and warnings where logging and tests can see
    them. A sample is counted once per pass (epoch). ``max_bad_fraction``
    (``data.max_bad_fraction``) bounds the skipping: when more than that share of the samples a
    rank reads in one pass is bad, the pass stops with a one-line error saying how many of how
    many (checked as the counts arrive, so a mostly broken split fails in its first batches, not
    after an epoch of repeats).
"""

from __future__ import annotations

import functools
import io
import math
import re
import warnings

import torch
from torch import Tensor

from abdist.errors import UserError

# Categories of bad samples, the keys of ShardSplit.bad_sample_counts (plus "total"). A shard whose
# bytes cannot be read is no bad sample but a damaged file: always an error (see the docstring).
BAD_REASONS = ("decode", "label", "missing")


IMAGE_EXTS = ("jpg", "jpeg", "png", "webp")
MAX_BAD_WARNINGS = 20  # per split and load: a badly broken shard must not flood the log


class BadSampleWarning(UserWarning):
    """A bad sample was skipped (``bad_data="skip"``); the message names the shard and key."""


class BadSample(Exception):
    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(detail)
        self.reason, self.detail = reason, detail


def short_error(exc: BaseException) -> str:
    """One line of an exception message, without torchvision's 'func, file.cpp:NN, ' prefix or
    PIL's object address ('cannot identify image file <_io.BytesIO object at 0x...>')."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    parts = text.split(", ")
    if len(parts) > 2 and ".cpp:" in parts[1]:
        text = ", ".join(parts[2:])
    text = re.sub(r" ?<[\w.]+ object at 0x[0-9a-fA-F]+>", "", text)
    return text[:160]


def sample_fields(
    fields: dict, num_classes: int, num_groups: int | None
) -> tuple[bytes, int, int, int]:
    """``(image bytes, label, idx, group)`` of a sample's members, or :class:`BadSample`.

    The one definition of a well-formed sample, shared by the streaming and the in-memory
    readers: an image member (jpg, jpeg, png, webp), ``cls`` an integer in ``[0, C)``, ``idx`` an
    integer, and (when the manifest lists groups) ``grp`` an integer in ``[0, G)``; group 0
    without groups.
    """
    data = next((fields[e] for e in IMAGE_EXTS if e in fields), None)
    if data is None:
        raise BadSample("missing", f"no image member (.{'/.'.join(IMAGE_EXTS)})")
    for member in ("cls", "idx"):
        if member not in fields:
            raise BadSample("missing", f"no .{member} member")
    try:
        label = int(fields["cls"])
    except ValueError:
        raise BadSample("label", f"label {fields['cls'][:20]!r} is not an integer") from None
    if not 0 <= label < num_classes:
        raise BadSample("label", f"label {label} outside [0, {num_classes})")
    try:
        idx = int(fields["idx"])
    except ValueError:
        raise BadSample("missing", f"idx {fields['idx'][:20]!r} is not an integer") from None
    if num_groups is None:
        return data, label, idx, 0
    if "grp" not in fields:
        raise BadSample("missing", "no .grp member (the manifest lists groups)")
    try:
        group = int(fields["grp"])
    except ValueError:
        raise BadSample("label", f"group {fields['grp'][:20]!r} is not an integer") from None
    if not 0 <= group < num_groups:
        raise BadSample("label", f"group {group} outside [0, {num_groups})")
    return data, label, idx, group


def warn_skipped(
    warned: int, shard: str, key: str, reason: str, detail: str, *, stacklevel: int
) -> int:
    """Warn that a bad sample was skipped, unless ``warned`` (the warnings given so far by this
    reader) reached MAX_BAD_WARNINGS; the last one says that further ones are only counted.
    Returns the new count. Both readers warn through here: one message, one cap."""
    if warned >= MAX_BAD_WARNINGS:
        return warned
    warned += 1
    more = "; further bad samples are only counted (bad_sample_counts)"
    warnings.warn(
        f"skipped bad sample '{key}' in shard {shard} ({reason}: {detail})"
        f"{more if warned == MAX_BAD_WARNINGS else ''}",
        BadSampleWarning,
        stacklevel=stacklevel,
    )
    return warned


def check_read_options(
    bad_data: str, max_bad_fraction: float | None, decoder: str = "torchvision"
) -> None:
    """One-line errors for reader options out of range (both shard readers)."""
    if bad_data not in ("skip", "error"):
        raise UserError(f"bad_data must be 'skip' or 'error', got {bad_data!r}")
    if max_bad_fraction is not None and not (
        isinstance(max_bad_fraction, (int, float))
        and not isinstance(max_bad_fraction, bool)
        and 0 <= max_bad_fraction <= 1
    ):
        raise UserError(
            f"max_bad_fraction must be a number in [0, 1] or None, got {max_bad_fraction!r}"
        )
    if decoder not in ("torchvision", "pil"):
        raise UserError(f"decoder must be 'torchvision' or 'pil', got {decoder!r}")


class BadSampleLedger:
    """The bad samples a streamed split met, counted and warned about in the training process:
    workers send their records with the batches, so no update between workers is lost."""

    MAX_RECENT = 100  # `recent` keeps the newest ones

    def __init__(self) -> None:
        self._counts = dict.fromkeys(BAD_REASONS, 0)
        self.recent: list[dict] = []
        self.warned = 0

    @property
    def counts(self) -> dict[str, int]:
        """By reason, plus ``"total"``."""
        return {**self._counts, "total": sum(self._counts.values())}

    def note(self, records: list[tuple]) -> None:
        """Count and warn about ``(reason, shard, key, detail, count)`` records."""
        for reason, shard, key, detail, count in records:
            self._counts[reason] += count
            self.recent.append(
                {"reason": reason, "shard": shard, "key": key, "detail": detail, "count": count}
            )
            self.warned = warn_skipped(self.warned, shard, key, reason, detail, stacklevel=4)
        del self.recent[: -self.MAX_RECENT]


class PassBadLimit:
    """``max_bad_fraction`` over one streamed pass: ``add`` the bad-sample records as they
    arrive; more than the limit of the ``covered`` samples stops the pass with one line, so a
    mostly broken split fails in its first batches, not after an epoch of repeats."""

    def __init__(self, split: str, covered: int, limit: float | None, where: str = "") -> None:
        self.split, self.covered, self.limit, self.where = split, covered, limit, where
        self.counts = dict.fromkeys(BAD_REASONS, 0)

    def add(self, records: list[tuple]) -> None:
        if not records or self.limit is None:
            return
        for reason, *_, count in records:
            self.counts[reason] += count
        bad = sum(self.counts.values())
        if over_bad_limit(bad, self.covered, self.limit):
            raise too_many_bad(
                self.split, bad, self.covered, self.limit, self.counts, self.where, so_far=True
            )


def bad_sample_error(key: str, shard: str, detail: str) -> UserError:
    """The one-line error for a bad sample under ``bad_data="error"`` (both readers)."""
    return UserError(
        f"bad sample '{key}' in shard {shard}: {detail} "
        "(bad_data='error'; bad_data='skip' skips and counts such samples)"
    )


def over_bad_limit(bad: int, of: int, limit: float | None) -> bool:
    """Whether ``bad`` skipped samples of ``of`` exceed the share ``limit`` (None: no limit)."""
    return limit is not None and bad > 0 and bad / max(of, bad) > limit


def too_many_bad(
    split: str,
    bad: int,
    of: int,
    limit: float,
    counts: dict[str, int],
    where: str = "",
    so_far: bool = False,
) -> UserError:
    """The one-line error when skipped samples exceed ``max_bad_fraction`` (both readers);
    ``so_far``: counted part-way through a pass (the streaming reader stops at once)."""
    reasons = ", ".join(f"{n} {r}" for r, n in counts.items() if n)
    at_least = "at least " if so_far else ""
    return UserError(
        f"{at_least}{bad} of {of} samples of split '{split}'{where} are unreadable (skipped as "
        f"bad: {reasons}), more than the limit data.max_bad_fraction={limit:g} allows "
        f"({math.floor(limit * of + 1e-9)}); repair or re-prepare the data (`abdist verify` "
        "checks it), or raise data.max_bad_fraction"
    )


@functools.cache  # resolved once per process (each loader worker)
def _torchvision_decoder():
    """torchvision's decode op, ``op(buffer, mode, apply_exif) -> [C, H, W]``, or None.

    The registered op rather than ``torchvision.io.decode_image``: the same pixels (same
    kernel) without the wrapper's per-call checks, usage logging and the deprecation warning
    torchvision 0.29 emits on every call (in favour of TorchCodec) -- together a quarter of the
    decode time of a CIFAR JPEG here. Falls back to the wrapper where the op is missing or has
    another signature, and to PIL (below) when torchvision has no decoders at all."""
    try:
        from torchvision.io import ImageReadMode, decode_image
    except ImportError:  # a future torchvision without image decoders
        return None
    modes = {1: ImageReadMode.GRAY, 3: ImageReadMode.RGB}

    def wrapper(buffer, channels):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)
            return decode_image(buffer, mode=modes[channels])

    try:
        op = torch.ops.image.decode_image
        probe = torch.frombuffer(bytearray(_probe_png()), dtype=torch.uint8)
        if torch.equal(op(probe, modes[3].value, False), wrapper(probe, 3)):
            return lambda buffer, channels: op(buffer, modes[channels].value, False)
    except (AttributeError, RuntimeError, TypeError):
        pass
    return wrapper


def _probe_png() -> bytes:
    """A 2x1 RGB PNG: the op must decode it as the wrapper does before it is used."""
    from PIL import Image

    im = Image.new("RGB", (2, 1), (255, 0, 0))
    im.putpixel((1, 0), (0, 0, 255))
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return buf.getvalue()


def decode_image(data: bytes, channels: int, decoder: str) -> Tensor:
    """Encoded bytes -> uint8 ``[channels, H, W]``."""
    decode = _torchvision_decoder() if decoder == "torchvision" else None
    if decode is not None:
        try:
            image = decode(torch.frombuffer(bytearray(data), dtype=torch.uint8), channels)
            if image.ndim == 3:
                return image
        except (RuntimeError, ValueError):
            pass  # not a format torchvision decodes, or corrupt: PIL has the last word
    import numpy as np
    from PIL import Image

    try:
        with Image.open(io.BytesIO(data)) as im:
            array = np.asarray(im.convert("RGB" if channels == 3 else "L"))
    except Exception as e:  # PIL raises many types for corrupt files
        raise BadSample("decode", f"image does not decode ({short_error(e)})") from None
    image = torch.from_numpy(array.copy())
    return image.permute(2, 0, 1) if image.ndim == 3 else image.unsqueeze(0)


def decode_sample(
    data: bytes, channels: int, size: tuple[int, int] | None, decoder: str = "torchvision"
) -> Tensor:
    """The one decode of a sample's image, for every reader: bytes -> uint8 ``[channels, H, W]``,
    resized (shorter side) and centre-cropped to ``size`` = (H, W) when it differs (None: as
    stored). Raises :class:`BadSample` ("decode") when the bytes are no image."""
    image = decode_image(data, channels, decoder)
    if size is not None and tuple(image.shape[-2:]) != tuple(size):
        image = fit_image(image, *size)
    return image


def preload_decoders(decoder: str) -> None:
    """Import the decoders here, so forked workers inherit them instead of each importing them
    again at every pass (seconds per worker on a busy 2-core machine)."""
    import PIL.Image  # noqa: F401

    if decoder == "torchvision":
        try:
            import torchvision.io  # noqa: F401
        except ImportError:
            pass


def fit_image(image: Tensor, height: int, width: int) -> Tensor:
    """Resize the shorter side to cover ``height x width``, then centre crop."""
    from torchvision.transforms.v2 import functional as TF

    h, w = image.shape[-2:]
    scale = max(height / h, width / w)
    size = [max(height, round(h * scale)), max(width, round(w * scale))]
    return TF.center_crop(TF.resize(image, size, antialias=True), [height, width])
