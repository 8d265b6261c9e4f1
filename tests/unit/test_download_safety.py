"""The download path against hostile URLs, over loopback HTTP only (127.0.0.1 allowed, 127.0.0.2 not).

Fast in-process tests of :func:`data_prep.fetch.fetch`, then one real img2dataset run of a
partition (no Ray), in the calling process and in img2dataset's spawned pool, that proves the
guard reaches wherever the shard runs: refused rows are counted ``bad_url``, never fetched,
nothing of theirs reaches the tar/parquet output, and a 30000x30000 PNG bomb is refused from
its header with the peak RSS of the process that ran the shard measured.
"""

from __future__ import annotations

import http.server
import io
import ipaddress
import json
import os
import socket
import struct
import tarfile
import threading
import time
import urllib.parse
import zlib

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from data_prep import download
from data_prep.fetch import FetchError, FetchLimits, check_header, download_image, fetch
from data_prep.url_policy import UrlPolicy
from pipeline.config import build
from pipeline.store import Store

POLICY = UrlPolicy(allow_networks=("127.0.0.1/32",))
LIMITS = FetchLimits(timeout_s=5, max_bytes=4 << 20, max_redirects=5)  # the bomb (~1.5 MB) fits
MARKER = b"PRIVATE-MARKER-7f3a9c"  # in the private server's answer and in the local file
BOMB_SIDE = 30_000


def _png(size=(64, 48), colour=(200, 30, 30), text: bytes | None = None) -> bytes:
    from PIL import PngImagePlugin

    info = PngImagePlugin.PngInfo()
    if text:
        info.add_text("secret", text.decode())
    buf = io.BytesIO()
    Image.new("RGB", size, colour).save(buf, format="PNG", pnginfo=info)
    return buf.getvalue()


def _jpeg(size=(40, 30)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, (20, 120, 200)).save(buf, format="JPEG")
    return buf.getvalue()


def bomb_png(side: int = BOMB_SIDE) -> bytes:
    """A valid single-colour ``side``x``side`` 8-bit PNG (900 MP for 30000) of ~1.5 MB, built in
    well under a second: every row is compressed once with a full flush, so the deflate stream
    is that segment repeated; the Adler-32 of all-zero data is ``(n mod 65521) << 16 | 1``."""
    row = bytes(side + 1)  # filter byte + pixels, all zero
    c = zlib.compressobj(9, zlib.DEFLATED, -15)
    segment = c.compress(row) + c.flush(zlib.Z_FULL_FLUSH)
    n = len(row) * side
    idat = b"\x78\xda" + segment * side + c.flush(zlib.Z_FINISH) + struct.pack(">I", (n % 65521) << 16 | 1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


class Site:
    """A loopback HTTP server with fixed routes ``{path: (status, headers, body)}``; records every
    request's raw path and Host header. ``{"stream": "1"}`` in headers: no Content-Length."""

    def __init__(self, host: str, routes: dict):
        self.routes, self.requests = routes, []
        site = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self):
                site.requests.append((self.path, self.headers.get("Host")))
                path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
                status, headers, body = site.routes.get(path, (404, {}, b"not found"))
                self.send_response(status)
                for k, v in headers.items():
                    if k != "stream":
                        self.send_header(k, v)
                if "stream" not in headers:
                    self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                for i in range(0, len(body), 1 << 16):
                    self.wfile.write(body[i:i + (1 << 16)])

            def log_message(self, *args):
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def handle_error(self, request, client_address):
                pass  # clients that stop reading (the size cap) hang up mid-body

        self.server = Server((host, 0), Handler)
        self.port = self.server.server_address[1]
        self.base = f"http://{host}:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def _redirect(to: str) -> tuple:
    return (302, {"Location": to}, b"")


@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    local = tmp_path_factory.mktemp("local") / "secret.txt"
    local.write_bytes(b"local file content " + MARKER)
    private = Site("127.0.0.2", {"/secret.png": (200, {}, _png(text=MARKER))})
    routes = {
        "/ok.png": (200, {"Content-Type": "image/png"}, _png()),
        "/images/café.jpg": (200, {}, _jpeg()),
        "/to-passwd": _redirect("file:///etc/passwd"),
        "/to-local": _redirect(f"file://{local}"),
        "/to-private": _redirect(f"{private.base}/secret.png"),
        "/to-metadata": _redirect("http://169.254.169.254/latest/meta-data/iam/"),
        "/to-data": _redirect("data:image/png;base64,iVBORw0KGgo="),
        "/hop/0": _redirect("/ok.png"),  # relative
        **{f"/hop/{i}": _redirect(f"/hop/{i - 1}") for i in range(1, 8)},
        "/loop": _redirect("/loop"),
        "/bomb.png": (200, {"Content-Type": "image/png"}, bomb_png()),
        "/big.bin": (200, {}, b"\xff" * (LIMITS.max_bytes + 10)),
        "/big-stream.bin": (200, {"stream": "1"}, b"\xff" * (LIMITS.max_bytes + 10)),
        "/corrupt.jpg": (200, {}, os.urandom(4096)),
        "/robots.png": (200, {"X-Robots-Tag": "noai"}, _png()),
        "/gray16.png": (200, {"Content-Type": "image/png"}, _gray16_png(GRAY16)),
    }
    public = Site("127.0.0.1", routes)
    try:
        yield {"a": public, "private": private, "local": str(local)}
    finally:
        public.close()
        private.close()


@pytest.fixture
def connections(monkeypatch):
    """Every socket the fetcher opens; anything outside 127.0.0.0/8 fails the test before connecting."""
    opened = []
    real = socket.create_connection

    def guarded(address, *args, **kwargs):
        assert ipaddress.ip_address(address[0]) in ipaddress.ip_network("127.0.0.0/8"), address
        opened.append(address)
        return real(address, *args, **kwargs)

    monkeypatch.setattr(socket, "create_connection", guarded)
    return opened


def _refused(url, reason="bad_url", **kw):
    with pytest.raises(FetchError) as e:
        fetch(url, POLICY, LIMITS, **kw)
    assert e.value.reason == reason, str(e.value)
    return str(e.value)


# --------------------------------------------------------------------------------------------- fetch


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "data:image/png;base64,iVBORw0KGgo=", "ftp://127.0.0.1/a.png",
    "http://10.0.0.1/a.png", "http://192.168.1.1/a.png", "http://169.254.169.254/latest/meta-data/",
    "http://[::1]/a.png", "http://[fd00::1]/a.png", "http://[::ffff:10.0.0.1]/a.png",
    "http://metadata.google.internal/computeMetadata/v1/", "http://127.0.0.2/a.png",
    "http://167772161/a.png",  # 10.0.0.1 as one number
])
def test_refused_urls_open_no_socket_and_ask_no_dns(url, connections):
    def no_dns(host, port):
        raise AssertionError("resolved a refused URL")

    _refused(url, resolver=no_dns)
    assert connections == []


def test_allowed_fetch_and_relative_redirect_chain(sites, connections):
    a = sites["a"]
    r = fetch(f"{a.base}/hop/3", POLICY, LIMITS)
    assert r.status == 200 and r.url == f"{a.base}/ok.png" and Image.open(io.BytesIO(r.body)).size == (64, 48)
    assert len(connections) == 5 and {c[0] for c in connections} == {"127.0.0.1"}
    assert "more than 5 redirects" in _refused(f"{a.base}/hop/7", reason="http_error")
    assert "more than 5 redirects" in _refused(f"{a.base}/loop", reason="http_error")
    assert _refused(f"{a.base}/missing.png", reason="http_error") == "http_error: HTTP Error 404: Not Found"


@pytest.mark.parametrize("route,expected", [
    ("/to-passwd", "scheme 'file' not allowed"), ("/to-local", "scheme 'file' not allowed"),
    ("/to-data", "scheme 'data' not allowed"), ("/to-private", "127.0.0.2 is a loopback address"),
    ("/to-metadata", "169.254.169.254 is a cloud metadata address"),
])
def test_redirects_are_rechecked_at_every_hop(sites, connections, route, expected):
    before = len(sites["private"].requests)
    message = _refused(sites["a"].base + route)
    assert expected in message
    assert connections == [("127.0.0.1", sites["a"].port)]  # only the first hop was opened
    assert len(sites["private"].requests) == before == 0  # the refused server never saw a request


def test_every_resolved_address_is_checked_and_the_connection_pinned(sites, connections):
    a = sites["a"]
    calls = []

    def resolver(host, port):
        calls.append(host)
        return {"images.test": ["127.0.0.1"], "mixed.test": ["127.0.0.1", "10.0.0.1"],
                "inside.test": ["127.0.0.2"]}[host]

    r = fetch(f"http://images.test:{a.port}/ok.png", POLICY, LIMITS, resolver=resolver)
    assert r.status == 200 and a.requests[-1] == ("/ok.png", f"images.test:{a.port}")
    # one lookup, and the socket went to the checked answer: no second lookup a rebinding DNS could answer
    assert calls == ["images.test"] and connections == [("127.0.0.1", a.port)]
    assert "10.0.0.1 is a private address" in _refused(f"http://mixed.test:{a.port}/ok.png", resolver=resolver)
    assert "127.0.0.2 is a loopback" in _refused(f"http://inside.test:{sites['private'].port}/s", resolver=resolver)
    assert len(connections) == 1 and sites["private"].requests == []


def test_body_size_is_capped(sites):
    a = sites["a"]
    assert "Content-Length" in _refused(f"{a.base}/big.bin", reason="too_large")
    assert "exceeds max_bytes" in _refused(f"{a.base}/big-stream.bin", reason="too_large")


def test_non_ascii_path_is_percent_encoded_and_fetched(sites):
    a = sites["a"]
    r = fetch(f"{a.base}/images/café.jpg", POLICY, LIMITS)
    assert Image.open(io.BytesIO(r.body)).format == "JPEG"
    assert a.requests[-1][0] == "/images/caf%C3%A9.jpg"


def test_header_check_refuses_the_bomb_before_decoding():
    data = bomb_png()
    assert len(data) < LIMITS.max_bytes
    with pytest.raises(FetchError, match=r"too_large: .*900000000 pixels"):  # PIL's own bomb check
        check_header(data, 89_478_485)
    with pytest.raises(FetchError, match=r"too_large: 1000x1000 exceeds 999999 pixels"):  # the explicit one
        check_header(_png((1000, 1000)), 999_999)
    with pytest.raises(FetchError, match="decode_error"):
        check_header(b"\x00" * 100, 89_478_485)
    check_header(_png(), 89_478_485)


def test_download_image_is_a_drop_in_for_img2dataset(sites):
    a = sites["a"]

    def dl(path):
        return download_image((7, a.base + path), 5, None, {"noai"}, policy=POLICY, limits=LIMITS)
    key, stream, err = dl("/ok.png")
    assert key == 7 and err is None and stream.read() == sites["a"].routes["/ok.png"][2]
    assert dl("/bomb.png")[1:] == (None, "too_large: Image size (900000000 pixels) exceeds limit of 178956970 "
                                         "pixels, could be decompression bomb DOS attack.")
    assert dl("/corrupt.jpg")[2].startswith("decode_error: ")
    assert dl("/robots.png")[1:] == (None, "Use of image disallowed by X-Robots-Tag directive")


# --------------------------------------------------------------------------------------------- img2dataset


ROWS = [  # (name, path or URL, expected reason or "ok")
    ("ok", "/ok.png", "ok"),
    ("cafe", "/images/café.jpg", "ok"),
    ("hops", "/hop/2", "ok"),
    ("file_passwd", "file:///etc/passwd", "bad_url"),
    ("file_local", "file://{local}", "bad_url"),
    ("data_uri", "data:image/png;base64,iVBORw0KGgo=", "bad_url"),
    ("to_passwd", "/to-passwd", "bad_url"),
    ("to_local", "/to-local", "bad_url"),
    ("to_private", "/to-private", "bad_url"),
    ("private", "{private}/secret.png", "bad_url"),
    ("bomb", "/bomb.png", "too_large"),
    ("big", "/big-stream.bin", "too_large"),
    ("corrupt", "/corrupt.jpg", "decode_error"),
    ("missing", "/missing.png", "http_error"),
    ("gray16", "/gray16.png", "ok"),
]


GRAY16 = 0.605  # a 16-bit grey at this share of full scale must be stored near 0.605 * 255, not white


def _gray16_png(level: float) -> bytes:
    img = Image.fromarray(np.full((64, 64), int(level * 65535), dtype=np.uint16))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()


def _stored_mean(out, sample_id: str) -> float:
    """Mean pixel value of the image img2dataset stored for ``sample_id`` in partition 0's tar."""
    with tarfile.open(out.child("parts/00000/00000.tar")) as t:
        members = {m.name: m for m in t.getmembers()}
        key = next(n[:-5] for n in members if n.endswith(".json")
                   and json.loads(t.extractfile(members[n]).read())["sample_id"] == sample_id)
        image = next(n for n in members if n.startswith(key + ".") and not n.endswith((".json", ".txt")))
        return float(np.asarray(Image.open(io.BytesIO(t.extractfile(members[image]).read())).convert("L")).mean())


@pytest.mark.parametrize("processes", [0, 1])  # in the calling process (default), img2dataset's spawned pool
def test_img2dataset_partition_refuses_hostile_rows_and_bounds_memory(sites, tmp_path, capsys, processes):
    a = sites["a"]
    urls = [u.format(local=sites["local"], private=sites["private"].base) for _, u, _ in ROWS]
    urls = [u if "://" in u or u.startswith("data:") else a.base + u for u in urls]
    table = pa.table({"url": urls, "caption": [n for n, _, _ in ROWS], "sample_id": [n for n, _, _ in ROWS]})
    store = Store(str(tmp_path))
    src, out = store.artifact("urls", "t"), store.artifact("download", "t")
    src.write_parquet("urls.parquet", table)
    cfg = build(download.DownloadConfig, {"rows_per_partition": 20, "rows_per_shard": 20, "image_size": 64,
                                          "threads": 4, "timeout_s": 5, "max_bytes": LIMITS.max_bytes,
                                          "processes_per_task": processes,
                                          "allow_networks": ["127.0.0.1/32"]}, "stages.download")
    part = download.plan_partitions(src, cfg)[0]
    t = time.time()
    record = download.download_partition(part, cfg, src, out)
    wall = time.time() - t

    status = pq.read_table(out.child("parts/00000/00000.parquet")).to_pylist()
    got = {r["sample_id"]: ("ok" if r["status"] == "success" else download.failure_reason(r["status"],
                                                                                         r["error_message"]))
           for r in status}
    assert got == {n: e for n, _, e in ROWS}, {r["sample_id"]: r["error_message"] for r in status}
    errors = {r["sample_id"]: r["error_message"] for r in status}
    assert "scheme 'file' not allowed" in errors["to_passwd"] and "127.0.0.2 is a loopback" in errors["to_private"]
    assert "900000000 pixels" in errors["bomb"]  # refused from its header, not for its size in bytes
    assert record["failed_by_reason"] == {"bad_url": 7, "decode_error": 1, "http_error": 1, "too_large": 2}
    assert sites["private"].requests == []  # the refused server never received a request

    # No local file content and no private-address answer reached the output.
    with open("/etc/passwd", "rb") as f:
        passwd_first_line = f.readline().strip()
    for root, _, files in os.walk(out.path):
        for fn in files:
            with open(os.path.join(root, fn), "rb") as f:
                data = f.read()
            assert MARKER not in data and passwd_first_line not in data, fn

    # The bomb cost (almost) nothing: measured in the img2dataset worker by getrusage.
    peak, base = record["peak_rss_mb"], record["base_rss_mb"]
    assert peak is not None and base is not None
    with capsys.disabled():
        print(f"\n[download safety] processes_per_task={processes}, RSS: base {base:.0f} MB, peak {peak:.0f} MB "
              f"(+{peak - base:.0f} MB with a {BOMB_SIDE}x{BOMB_SIDE} PNG bomb in the shard), {wall:.1f}s")
    assert peak - base < 200
    # 16-bit samples reach img2dataset's resizer as 8 bits: stored grey, not saturated white.
    assert abs(_stored_mean(out, "gray16") - GRAY16 * 255) < 4
