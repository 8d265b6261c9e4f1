"""The demo "web site": items written as files under a root on any pyarrow filesystem (local
or S3), served read-only on 127.0.0.1 while the pipeline downloads them."""

from __future__ import annotations

import contextlib
import http.server
import mimetypes
import posixpath
import sys
import threading
import urllib.parse
from collections.abc import Iterable, Iterator

import pyarrow.fs as pafs

from data_prep.demo.item import DemoItem


def write_site(fs: pafs.FileSystem, root: str, items: Iterable[DemoItem]) -> list[dict]:
    """Write each item to ``root/images/<name>`` on `fs` (except http_404 ones); return rows.

    `root` is a path in `fs`'s own form: an absolute local path, or ``bucket/prefix`` for S3.
    Rows hold sample_id, path (relative to root), caption, expected, width, height.
    """
    root = root.rstrip("/")
    fs.create_dir(f"{root}/images", recursive=True)
    rows = []
    for item in items:
        path = f"images/{item.name}"
        if item.expected != "http_404":
            with fs.open_output_stream(f"{root}/{path}") as f:
                f.write(item.data)
        rows.append(
            {
                "sample_id": item.sample_id,
                "path": path,
                "caption": item.caption,
                "expected": item.expected,
                "width": item.width,
                "height": item.height,
                "labels": item.labels,
            }
        )
    return rows


class _Handler(http.server.BaseHTTPRequestHandler):
    """GET/HEAD of files below `root` on a pyarrow filesystem; 404 for anything else."""

    fs: pafs.FileSystem
    root: str

    def _respond(self, with_body: bool) -> None:
        rel = posixpath.normpath(urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)).lstrip("/")
        path = f"{self.root}/{rel}"
        # Ask for the file type first: pyarrow reports a directory (or S3 prefix) opened for
        # reading as a bare OSError, which must be a 404 like a missing file.
        if rel in ("", ".") or rel.startswith("..") or self.fs.get_file_info(path).type != pafs.FileType.File:
            self.send_error(404)
            return
        try:
            with self.fs.open_input_stream(path) as f:
                data = f.readall()
        except FileNotFoundError:  # deleted since get_file_info
            self.send_error(404)
            return
        except OSError as err:
            self.send_error(500, explain=str(err))
            return
        self.send_response(200)
        self.send_header("Content-Type", mimetypes.guess_type(rel)[0] or "application/octet-stream")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        if with_body:
            self.wfile.write(data)

    def do_GET(self) -> None:
        self._respond(with_body=True)

    def do_HEAD(self) -> None:
        self._respond(with_body=False)

    def log_message(self, format: str, *args) -> None:
        pass  # quiet: img2dataset makes thousands of requests


class _QuietServer(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request, client_address) -> None:
        if not isinstance(sys.exc_info()[1], ConnectionError):  # clients that time out and hang up
            super().handle_error(request, client_address)


@contextlib.contextmanager
def serve(fs: pafs.FileSystem, root: str, port: int = 0) -> Iterator[str]:
    """Serve `root` on `fs` at ``http://127.0.0.1:<port>``; yield that base URL.

    ``port=0`` picks a free port; the pipeline passes a fixed one because the URLs written
    into a cached ``urls.parquet`` must stay valid on later runs.

    Files are read through `fs` on every request, so local and S3-backed roots behave the
    same. The server is shut down and its thread joined on exit.
    """
    handler = type("Handler", (_Handler,), {"fs": fs, "root": root.rstrip("/")})
    try:
        server = _QuietServer(("127.0.0.1", port), handler)
    except OSError as e:
        raise OSError(f"demo site: cannot listen on 127.0.0.1:{port} ({e.strerror}); "
                      "pick another with urls.port=NNNN") from e
    with serving(server, "demo-data-server") as base_url:
        yield base_url


@contextlib.contextmanager
def serving(server: http.server.HTTPServer, name: str) -> Iterator[str]:
    """Run ``server`` (bound to 127.0.0.1) in a daemon thread; yield its base URL; shut it down after."""
    thread = threading.Thread(target=server.serve_forever, name=name, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()
