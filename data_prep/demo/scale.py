"""Scale mode of the demo site: tens of thousands of distinct images on 127.0.0.1, optionally
with per-response latency and a failure mix like a LAION crawl's, for benchmarks a user would
believe (``benchmarks/bench_data_prep.py``).

Drawing 20,000 scenes with :func:`~data_prep.demo.catalog.generate` would take many minutes,
so a small pool of drawn scenes is varied instead: row ``i`` is scene ``i % pool``, mirrored
and shifted by an amount of its own and stamped with its index in its first pixel row, so
every file has its own bytes (the exact-duplicate filter keeps all of them) and keeps its
scene's caption and ``labels``. Everything is made in memory before serving and is the same
for the same ``seed``.

Failure mix (``failures=True``): about one row in eight fails, in these shares of all rows,
roughly the proportions img2dataset reports on LAION-400M (success ~88 %; most failures are
HTTP errors, then timeouts and resets, then bodies that are not images):

    http_404          5.0 %   the server answers 404
    slow_host         2.0 %   answers after ``slow_s`` (past a 1-2 s download timeout: a timeout)
    connection_reset  1.5 %   the connection is reset before any response
    not_image         2.5 %   200 with an HTML body behind an image URL
    truncated         1.0 %   a JPEG cut in half

Latency (``latency_ms``) is added to every response, as a remote host's round trips would.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import socket
import struct
import sys
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image

from data_prep.demo.catalog import generate
from data_prep.demo.site import serving

FAILURE_MIX = (("http_404", 0.05), ("slow_host", 0.02), ("connection_reset", 0.015), ("not_image", 0.025),
               ("truncated", 0.01))
NOT_IMAGE = b"<!doctype html><html><head><title>Moved</title></head><body>This image has moved.</body></html>"


@dataclass(frozen=True)
class ScaleSite:
    """n: rows; pool: distinct drawn scenes the rows vary; latency_ms: added to every response;
    failures: the failure mix above (else every row is a good image); slow_s: a slow host's delay."""

    n: int = 20_000
    seed: int = 0
    pool: int = 48
    latency_ms: float = 0.0
    failures: bool = False
    slow_s: float = 3.0
    quality: int = 90

    def validate(self) -> None:
        if self.n < 1 or self.pool < 1:
            raise ValueError(f"scale site: n and pool must be ≥ 1, got {self.n} / {self.pool}")
        if self.latency_ms < 0 or self.slow_s < 0:
            raise ValueError(f"scale site: latency_ms and slow_s must be ≥ 0, got {self.latency_ms} / {self.slow_s}")


def _variant(base: np.ndarray, i: int, pool: int) -> np.ndarray:
    """Scene ``i % pool``, mirrored on odd rounds, shifted by the round, index in the first row."""
    rnd = i // pool
    img = base[:, ::-1] if rnd % 2 else base
    img = np.roll(img, rnd % max(1, img.shape[1] // 4), axis=1).copy()
    stamp = np.frombuffer(struct.pack(">I", i), dtype=np.uint8)
    img[0, :4, :] = stamp[:, None]  # 4 pixels of a 64+ px image: invisible, but unique bytes
    return img


def failure_kinds(n: int, seed: int) -> list[str]:
    """Per row, ``ok`` or a kind of :data:`FAILURE_MIX`, drawn independently in its shares."""
    names = [k for k, _ in FAILURE_MIX] + ["ok"]
    p = [share for _, share in FAILURE_MIX]
    return [str(k) for k in np.random.default_rng([seed, 13]).choice(names, size=n, p=p + [1.0 - sum(p)])]


def build(site: ScaleSite) -> tuple[dict[str, bytes], dict[str, str], list[dict]]:
    """(files by path, failure kind by path, URL-list rows). Rows have the demo URL list's keys
    (sample_id, path, caption, expected, width, height, labels)."""
    site.validate()
    scenes = list(generate(site.pool, site.seed, photos=False))
    bases = [np.asarray(Image.open(io.BytesIO(s.data)).convert("RGB")) for s in scenes]
    kinds = failure_kinds(site.n, site.seed) if site.failures else ["ok"] * site.n
    files: dict[str, bytes] = {}
    behaviour: dict[str, str] = {}
    rows = []
    for i, kind in enumerate(kinds):
        scene, base = scenes[i % site.pool], bases[i % site.pool]
        sample_id = f"scale-{i:07d}"
        path = f"images/{sample_id}.jpg"
        buf = io.BytesIO()
        Image.fromarray(_variant(base, i, site.pool)).save(buf, format="JPEG", quality=site.quality)
        data = buf.getvalue()
        if kind == "not_image":
            data = NOT_IMAGE
        elif kind == "truncated":
            data = data[: len(data) // 2]
        if kind != "http_404":
            files[path] = data
        if kind in ("slow_host", "connection_reset"):
            behaviour[path] = kind
        h, w = base.shape[:2]
        rows.append({"sample_id": sample_id, "path": path, "caption": scene.caption, "expected": kind,
                     "width": w, "height": h, "labels": scene.labels})
    return files, behaviour, rows


class _Handler(http.server.BaseHTTPRequestHandler):
    files: dict[str, bytes]
    behaviour: dict[str, str]
    latency_s: float
    slow_s: float
    protocol_version = "HTTP/1.0"

    def do_GET(self) -> None:
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).lstrip("/")
        kind = self.behaviour.get(path)
        if self.latency_s:
            time.sleep(self.latency_s)
        if kind == "connection_reset":  # RST instead of FIN: the client sees "connection reset by peer"
            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            self.close_connection = True
            return
        if kind == "slow_host":
            time.sleep(self.slow_s)
        data = self.files.get(path)
        if data is None:
            self.send_error(404)
            return
        try:
            self.send_response(200)
            self.send_header("Content-Type", "text/html" if data.startswith(b"<!doctype") else "image/jpeg")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except ConnectionError:  # the client gave up (a timeout on a slow host)
            pass

    def log_message(self, format: str, *args) -> None:
        pass


class _Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    request_queue_size = 1024  # hundreds of download threads connect at once

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve_scale(site: ScaleSite, files: dict[str, bytes], behaviour: dict[str, str], port: int = 0) -> Iterator[str]:
    """Serve :func:`build`'s files from memory at ``http://127.0.0.1:<port>``; yield that base URL."""
    handler = type("ScaleHandler", (_Handler,), {"files": files, "behaviour": behaviour,
                                                  "latency_s": site.latency_ms / 1000, "slow_s": site.slow_s})
    with serving(_Server(("127.0.0.1", port), handler), "demo-scale-server") as base_url:
        yield base_url
