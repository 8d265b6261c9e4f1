"""data_prep.tars against the standard library's tarfile: the same members read, the same bytes written."""

from __future__ import annotations

import io
import tarfile

import pytest

from data_prep import tars


def _tarfile_bytes(files, fmt, extra=()):
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=fmt) as t:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 1_700_000_000, 0o644
            t.addfile(info, io.BytesIO(data))
        for info in extra:  # not regular files: skipped by both readers
            t.addfile(info)
    return buf.getvalue()


def _stdlib_members(raw: bytes):
    with tarfile.open(fileobj=io.BytesIO(raw), mode="r|") as t:
        return [(m.name, t.extractfile(m).read()) for m in t if m.isfile()]


def _files():
    long_dir = "d" * 120 + "/"  # ustar's prefix field (POSIX) or a long-name member (GNU)
    return [("000000001.jpg", b"\xff\xd8" + bytes(range(256)) * 7), ("000000001.txt", "ünïcode".encode()),
            ("000000001.json", b"{}"), ("empty.txt", b""), ("exactly.bin", b"x" * 1024),
            (long_dir + "000000002.jpg", b"a" * 513), ("n" * 150 + ".txt", b"long name"), ("ünï/ß.txt", b"utf-8 name")]


@pytest.mark.parametrize("fmt", [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_members_are_what_tarfile_reads(fmt):
    files = [f for f in _files() if fmt != tarfile.USTAR_FORMAT or not f[0].startswith("nnn")]  # ustar: name ≤ 100
    link = tarfile.TarInfo("link.jpg")
    link.type, link.linkname = tarfile.SYMTYPE, "000000001.jpg"
    folder = tarfile.TarInfo("folder")
    folder.type = tarfile.DIRTYPE
    raw = _tarfile_bytes(files, fmt, [link, folder])
    got = list(tars.members(io.BytesIO(raw)))
    assert got == _stdlib_members(raw)
    assert [n for n, _ in got] == [n for n, _ in files]  # links and folders skipped


def test_damaged_archives_raise_read_error():
    raw = _tarfile_bytes(_files(), tarfile.PAX_FORMAT)
    with pytest.raises(tarfile.ReadError, match="end of data"):
        list(tars.members(io.BytesIO(raw[:2000])))  # cut inside a member
    bad = bytearray(raw)
    bad[10] ^= 0x01  # a name byte of the first header: its checksum no longer matches
    with pytest.raises(tarfile.ReadError, match="checksum"):
        list(tars.members(io.BytesIO(bytes(bad))))
    assert list(tars.members(io.BytesIO(b""))) == []


def test_write_gives_tarfiles_gnu_bytes():
    files = [(f"{i:09d}.{ext}", bytes([i]) * (i * 97 % 1500)) for i in range(40)
             for ext in ("txt", "recaption.txt", "json", "64.jpg")]
    want = io.BytesIO()
    with tarfile.open(fileobj=want, mode="w|", format=tarfile.GNU_FORMAT) as sink:
        for name, data in files:
            info = tarfile.TarInfo(name)
            info.size, info.mtime, info.mode = len(data), 0, 0o444
            sink.addfile(info, io.BytesIO(data))
    assert tars.write(files) == want.getvalue()
    assert tars.write(iter(files)) == want.getvalue()  # a generator, consumed once
    long = [("k" * 120 + ".txt", b"needs a long-name member")] + files[:3]
    assert list(tars.members(io.BytesIO(tars.write(long)))) == long
    assert len(tars.write([])) == tars.RECORD
