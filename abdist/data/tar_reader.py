"""The one tar reader: WebDataset-format shards as ``(position, key, {ext: bytes})`` samples.

Every path that reads shard bytes goes through here (the streamed loader, in-memory loading,
``abdist verify``). A sample is a run of consecutive members with the same key, by WebDataset's
rule (the path up to the basename's first dot). ``tarfile`` is not used: its member iteration
alone cost ~130 us per CIFAR sample here, four times the JPEG decode; this header parser does
~25 us, checks every header checksum and knows the shard and key of every error.
"""

from __future__ import annotations

from collections.abc import Iterator

_ZERO_BLOCK = bytes(512)


class TarError(Exception):
    """The shard's bytes are not a readable tar from here on."""


def _octal(field: bytes) -> int:
    if field[:1] and field[0] & 0x80:  # GNU base-256 for sizes >= 8 GiB
        return int.from_bytes(field[1:], "big")
    return int(field.split(b"\0", 1)[0].strip() or b"0", 8)


def _pax_path(data: bytes) -> str | None:
    """The ``path`` record of a pax extended header, if any (records: ``"%d key=value\\n"``)."""
    path, i = None, 0
    while i < len(data) and data[i : i + 1] != b"\0":
        space = data.index(b" ", i)
        length = int(data[i:space])
        if length <= space - i:
            raise ValueError("bad pax record length")
        key, _, value = data[space + 1 : i + length - 1].partition(b"=")
        if key == b"path":
            path = value.decode("utf-8", "replace")
        i += length
    return path


def split_key(name: str) -> tuple[str, str] | tuple[None, None]:
    """WebDataset's rule: key = path up to the basename's first dot; extension = the rest."""
    slash = name.rfind("/")
    dot = name.find(".", slash + 1)
    if dot <= slash + 1:
        return None, None
    return name[:dot], name[dot + 1 :].lower()


def tar_members(f) -> Iterator[tuple[str, int, int]]:
    """Yield ``(name, size, padded_size)`` of each regular member of the tar stream ``f``.

    The consumer must read or seek over exactly ``padded_size`` bytes before asking for the
    next member. Handles ustar, pax (``x``) and GNU long-name (``L``) headers and checks every
    header checksum; raises :class:`TarError` where the bytes stop being a tar, including a
    stream that ends without the end-of-archive marker (every tar writer writes it: a file that
    lacks it was cut off, possibly between two samples).
    """
    long_name: str | None = None
    while True:
        offset = f.tell()
        header = f.read(512)
        if len(header) < 512 or header == _ZERO_BLOCK:
            if len(header) < 512:
                what = "header" if header else "end-of-archive marker"
                raise TarError(f"truncated: no tar {what} at byte {offset}")
            return
        try:
            checksum = _octal(header[148:156])
            size = _octal(header[124:136])
        except ValueError:
            raise TarError(f"corrupt tar header at byte {offset}") from None
        if checksum != sum(header) - sum(header[148:156]) + 256:
            raise TarError(f"tar header checksum mismatch at byte {offset}")
        padded = (size + 511) & ~511
        kind = header[156:157]
        if kind in (b"x", b"L"):  # describes the next member's name
            data = f.read(padded)
            if len(data) < size:
                raise TarError(f"truncated tar member at byte {offset}")
            try:
                if kind == b"L":
                    long_name = data[:size].split(b"\0", 1)[0].decode("utf-8", "replace")
                else:
                    long_name = _pax_path(data[:size]) or long_name
            except ValueError:
                raise TarError(f"corrupt pax header at byte {offset}") from None
            continue
        if kind not in (b"0", b"\0", b"7"):  # directories, links, global pax headers
            f.seek(padded, 1)
            long_name = None
            continue
        if long_name is not None:
            name, long_name = long_name, None
        else:
            name = header[:100].split(b"\0", 1)[0].decode("utf-8", "replace")
            if header[257:263] == b"ustar\x00":  # POSIX ustar: the name may have a prefix
                prefix = header[345:500].split(b"\0", 1)[0]
                if prefix:
                    name = prefix.decode("utf-8", "replace") + "/" + name
        yield name, size, padded


def shard_samples(path: str, start: int, stop: int) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(position, key, {ext: bytes})`` for the samples at positions [start, stop) of the
    shard file ``path`` (see :func:`tar_samples`)."""
    with open(path, "rb", buffering=1 << 18) as f:
        yield from tar_samples(f, start, stop)


def tar_samples(f, start: int, stop: int) -> Iterator[tuple[int, str, dict]]:
    """Yield ``(position, key, {ext: bytes})`` for the samples at positions [start, stop) of the
    tar stream ``f`` (a file, or ``io.BytesIO`` of a whole shard).

    A sample is a run of consecutive members with the same key (WebDataset's grouping); the
    samples before ``start`` are skipped by seeking over their data, not read. If the tar breaks
    off, :class:`TarError` says where, naming the last sample key seen; the sample it broke off
    in is not yielded (it may lack members).
    """
    pos, key, fields = -1, None, None
    try:
        for name, size, padded in tar_members(f):
            member_key, ext = split_key(name)
            if member_key is not None and member_key != key:
                if fields is not None:
                    yield pos, key, fields
                pos, key = pos + 1, member_key
                if pos >= stop:
                    return
                fields = {} if pos >= start else None
            if fields is not None and member_key is not None:
                data = f.read(padded)
                if len(data) < size:
                    raise TarError(f"truncated tar member '{name}'")
                fields[ext] = data if size == padded else data[:size]
            else:
                f.seek(padded, 1)
    except TarError as e:
        after = f", in or after sample '{key}'" if key else ""
        raise TarError(f"{e}{after}") from None
    if fields is not None:
        yield pos, key, fields
