"""Tar archives at the rate the data stages need: regular members streamed out of a tar, and
WebDataset tars written byte for byte as ``tarfile`` writes them (GNU format).

Why not ``tarfile``: every data stage walks the download's img2dataset tars, three members a
sample, each behind a PAX extended header. ``tarfile`` spends ~80 µs of Python a member on
objects and checks we do not use: at 20,000 rows that was a tenth of the filter and recaption
passes and a fifth of the shard stage (py-spy, BENCHMARKS.md thirteenth session). Here a member
is one 512-byte header parsed with a slice or two. The format is POSIX.1-2001 (ustar + pax) and
GNU's long names; anything else than a regular file is skipped, as the stages always did.
"""

from __future__ import annotations

import io
import tarfile
from collections.abc import Iterable, Iterator
from typing import BinaryIO

BLOCK = 512
RECORD = 20 * BLOCK  # tarfile pads an archive to whole records
BUFFER = 1 << 20  # read-ahead of an input stream: a member costs one header, not three small reads
_REGULAR = (b"0", b"\0", b"7")  # file, old-style file, contiguous file
_ZERO = bytes(BLOCK)


def _number(field: bytes) -> int:
    """An octal header field, or GNU's base-256 form (high bit of the first byte set)."""
    if field[:1] and field[0] & 0x80:
        n = int.from_bytes(field[1:], "big")
        return n - (1 << (8 * (len(field) - 1) - 1)) * 2 if field[0] & 0x40 else n  # 0xff: negative
    text = field.split(b"\0", 1)[0].strip()
    try:
        return int(text, 8) if text else 0
    except ValueError:
        raise tarfile.ReadError(f"invalid number field {field!r}") from None


def _check(header: bytes) -> None:
    stored = _number(header[148:156])
    unsigned = sum(header) - sum(header[148:156]) + 8 * 32  # the checksum field counts as spaces
    if stored != unsigned:  # tarfile also accepts the historical signed sum
        signed = unsigned - 256 * sum(b > 127 for b in header[:148] + header[156:])
        if stored != signed:
            raise tarfile.ReadError("bad checksum in tar header")


def _pax(data: bytes) -> dict[bytes, bytes]:
    """PAX records: ``"%d %s=%s\\n"``, the length counting the whole record."""
    out, pos = {}, 0
    while pos < len(data):
        space = data.index(b" ", pos)
        length = int(data[pos:space])
        key, _, value = data[space + 1:pos + length - 1].partition(b"=")
        out[key] = value
        pos += length
    return out


def members(f: BinaryIO) -> Iterator[tuple[str, bytes]]:
    """``(name, data)`` of every regular file in a tar stream, in order (as ``tarfile.open(mode="r|")``
    lists them; names decoded as UTF-8, as tarfile's PAX names are). Raises ``tarfile.ReadError`` on a
    damaged or truncated archive. Reads one member at a time: memory is bounded by the largest file."""

    def read(n: int) -> bytes:
        data = f.read(n)
        if len(data) != n:
            raise tarfile.ReadError("unexpected end of data")
        return data

    long_name: bytes | None = None
    pax: dict[bytes, bytes] = {}
    while True:
        header = f.read(BLOCK)
        if not header or header == _ZERO:
            return  # end of archive (tarfile also stops at the first zero block)
        if len(header) != BLOCK:
            raise tarfile.ReadError("unexpected end of data")
        _check(header)
        kind = header[156:157]
        size = _number(header[124:136])
        if b"size" in pax:
            size = int(pax[b"size"])
        data = read(size + (-size % BLOCK))[:size]  # with the padding to the next block
        if kind in (b"x", b"g"):
            if kind == b"x":  # applies to the next member only; global headers carry nothing we use
                pax = _pax(data)
            continue
        if kind == b"L":  # GNU long name of the next member
            long_name = data.rstrip(b"\0")
            continue
        if kind in _REGULAR:
            if b"path" in pax:
                raw = pax[b"path"]
            elif long_name is not None:
                raw = long_name
            else:
                name, prefix = header[:100].split(b"\0", 1)[0], header[345:500].split(b"\0", 1)[0]
                ustar = header[257:263] == b"ustar\0"  # GNU's magic has no prefix field
                raw = prefix + b"/" + name if ustar and prefix else name
            yield raw.decode("utf-8", "surrogateescape"), data
        long_name, pax = None, {}


def _header(name: bytes, size: int) -> bytes:
    """A GNU-format header for a regular file of mode 0444, mtime 0, owner 0:0 (tarfile's bytes)."""
    head = b"".join([
        name.ljust(100, b"\0"), b"0000444\0", b"0000000\0", b"0000000\0", b"%011o\0" % size,
        b"00000000000\0", b" " * 8, b"0", bytes(100), b"ustar  \0", bytes(32), bytes(32),
        bytes(8), bytes(8), bytes(155)]).ljust(BLOCK, b"\0")
    return head[:148] + b"%06o\0 " % sum(head) + head[156:]


def write(files: Iterable[tuple[str, bytes]]) -> bytes:
    """A tar of ``(name, data)`` files: the bytes ``tarfile.open(mode="w|", format=GNU_FORMAT)``
    writes for members of mode 0444 and mtime 0 (fixed: a rerun writes an identical shard). GNU
    headers, not PAX: PAX's extended header per member took half of ``tarfile``'s write time."""
    files = list(files)
    out: list[bytes] = []
    n = 0
    for name, data in files:
        raw = name.encode("utf-8")
        if len(raw) >= 100:  # needs a GNU long-name member: leave it to tarfile
            return _write_with_tarfile(files)
        pad = -len(data) % BLOCK
        out += [_header(raw, len(data)), data, bytes(pad)]
        n += BLOCK + len(data) + pad
    n += 2 * BLOCK
    out.append(bytes(2 * BLOCK + (-n % RECORD)))
    return b"".join(out)


def _write_with_tarfile(files: list[tuple[str, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w|", format=tarfile.GNU_FORMAT) as sink:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            sink.addfile(info, io.BytesIO(data))
    return buf.getvalue()
