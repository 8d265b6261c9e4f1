"""A safe HTTP fetch for one image URL, and the hook that makes img2dataset use it.

Why a fetcher of our own: img2dataset fetches with ``urllib.request.urlopen``, which follows
redirects by itself (to ``file:``, ``ftp:`` or a private address), opens ``file:`` and
``data:`` URLs, reads a response of any size into memory, and then hands the bytes to
``cv2.imdecode`` before looking at the image size (a 30000x30000 PNG of a few MB decodes to
900 MB+). :func:`fetch` instead, for every hop of a redirect chain:

1. checks the URL with :func:`data_prep.url_policy.check_url` (scheme, host, IP literal), and
   percent-encodes the path and query as browsers do (non-ASCII paths work);
2. resolves the host once and checks EVERY address with :func:`~data_prep.url_policy.check_address`;
3. connects to one of exactly those checked addresses (the connection is pinned to them, so a
   second DNS answer cannot rebind the name to 127.0.0.1), with TLS verified against the host name;
4. reads at most ``max_bytes`` (Content-Length checked first, the stream cut after that), and
   everything ends after ``DEADLINE_FACTOR * timeout_s`` in total (no slow-drip servers);

and :func:`download_image` then reads the image header with :func:`data_prep.images.open_image`
(header only, no decode) and refuses more than ``max_pixels`` before cv2 ever sees the bytes.
Errors are ``"<reason>: <detail>"`` with ``reason`` one of the download stage's counted reasons
(``bad_url``, ``too_large``, ``http_error``, ``network_error``, ``decode_error``).

How it gets into img2dataset (and why this way): img2dataset runs its downloads in ``spawn``ed
worker processes, so patching ``urllib`` or img2dataset in the Ray task would not reach them.
What does reach them is the ``Downloader`` object img2dataset pickles to every worker.
:func:`img2dataset_guard` makes ``img2dataset.download`` build a :class:`GuardedDownloader`
around its own ``Downloader``; unpickled in the worker, its ``__call__`` points the worker's
``img2dataset.downloader.download_image`` at :func:`download_image` (with this run's policy
and limits) before the shard starts. Everything else (the reader, resizer, writers, the
per-row status parquet and ``_stats.json`` resume markers) stays img2dataset's own, so the
output layout is unchanged, and every refused row is still a row with ``status`` and
``error_message``. The worker also measures its own peak RSS (``getrusage``) and leaves one
small JSON report per shard for the Ray task to sum up. As a second line behind the header
check, ``OPENCV_IO_MAX_IMAGE_PIXELS`` is set for the workers, so cv2 itself refuses to
decode more pixels than allowed.

Memory bound of one worker: imports (~1 GB: img2dataset imports webdataset, which imports
torch) + ``2 * threads * max_bytes`` (img2dataset keeps up to twice its thread count of
downloaded samples in flight) + one decode of at most ``max_pixels`` pixels (its resizer
decodes one image at a time). Proxies (``http_proxy``) are not used: the policy must see the
real destination.
"""

from __future__ import annotations

import contextlib
import functools
import http.client
import importlib
import io
import json
import os
import resource
import signal
import socket
import ssl
import sys
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

from data_prep.images import DEFAULT_MAX_PIXELS, BadImage, eight_bit_png, open_image
from data_prep.url_policy import Refused, Target, UrlPolicy, check_address, check_url

USER_AGENT = "Mozilla/5.0 (X11; Ubuntu; Linux x86_64; rv:72.0) Gecko/20100101 Firefox/72.0"  # img2dataset's
REDIRECTS = (301, 302, 303, 307, 308)
DEADLINE_FACTOR = 4  # a whole fetch (all hops, whole body) ends after this many timeouts
CHUNK = 1 << 16


@dataclass(frozen=True)
class FetchLimits:
    timeout_s: float = 10.0  # per connect / read
    max_bytes: int = 16 << 20  # body size cap per response
    max_pixels: int = DEFAULT_MAX_PIXELS  # header width*height cap, checked before any decode
    max_redirects: int = 5


class FetchError(Exception):
    """A refused or failed fetch; ``str()`` is ``"<reason>: <detail>"``."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason


@dataclass(frozen=True)
class Response:
    url: str  # the final URL, after redirects
    status: int
    headers: http.client.HTTPMessage
    body: bytes


Resolver = Callable[[str, int], list[str]]


def resolve(host: str, port: int) -> list[str]:
    """Every address ``host`` resolves to (one DNS lookup)."""
    infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


def fetch(url: str, policy: UrlPolicy, limits: FetchLimits = FetchLimits(), *, user_agent: str = USER_AGENT,
          resolver: Resolver = resolve) -> Response:
    """GET ``url`` under ``policy`` and ``limits``; raises :class:`FetchError`. Nothing is opened
    (no DNS, no socket) for a URL the policy refuses from its string alone."""
    deadline = time.monotonic() + DEADLINE_FACTOR * limits.timeout_s
    for _ in range(limits.max_redirects + 1):
        if time.monotonic() > deadline:
            raise FetchError("network_error", "timed out: redirects took longer than the fetch deadline")
        target = _check(url, policy)
        addresses = [str(target.address)] if target.address is not None else _resolve_checked(target, policy,
                                                                                                 resolver)
        conn = _connection(target, addresses, limits.timeout_s)
        try:
            conn.putrequest("GET", target.path, skip_accept_encoding=True)
            for k, v in (("User-Agent", user_agent), ("Accept", "*/*"), ("Accept-Encoding", "identity"),
                         ("Connection", "close")):
                conn.putheader(k, v)
            conn.endheaders()
            resp = conn.getresponse()
            if resp.status in REDIRECTS:
                location = resp.getheader("Location")
                if not location:
                    raise FetchError("http_error", f"HTTP Error {resp.status}: redirect without Location")
                url = urllib.parse.urljoin(target.url, location.strip())
                continue
            if not 200 <= resp.status < 300:
                raise FetchError("http_error", f"HTTP Error {resp.status}: {resp.reason}")
            return Response(target.url, resp.status, resp.headers, _read_capped(resp, limits.max_bytes, deadline))
        except (OSError, http.client.HTTPException) as e:
            raise FetchError("network_error", f"{type(e).__name__}: {e}") from None
        finally:
            conn.close()
    raise FetchError("http_error", f"more than {limits.max_redirects} redirects")


def _check(url: str, policy: UrlPolicy) -> Target:
    try:
        return check_url(url, policy)
    except Refused as e:
        raise FetchError("bad_url", f"{e} [{url[:200]}]") from None


def _resolve_checked(target: Target, policy: UrlPolicy, resolver: Resolver) -> list[str]:
    try:
        addresses = resolver(target.host, target.port)
    except OSError as e:
        raise FetchError("network_error", f"cannot resolve {target.host!r}: {e}") from None
    if not addresses:
        raise FetchError("network_error", f"{target.host!r} resolves to nothing")
    for a in addresses:  # all of them: a name that can point inside is refused, not raced
        try:
            check_address(a, policy)
        except Refused as e:
            raise FetchError("bad_url", f"host {target.host!r} resolves to a refused address: {e}") from None
    return addresses


def _open_socket(addresses: list[str], port: int, timeout: float) -> socket.socket:
    error: OSError | None = None
    for a in addresses:
        try:
            return socket.create_connection((a, port), timeout)  # a numeric address: no DNS here
        except OSError as e:
            error = e
    assert error is not None
    raise error


class _PinnedHTTP(http.client.HTTPConnection):
    """HTTP to ``host`` (Host header) over a socket to one of the already-checked ``addresses``."""

    def __init__(self, host: str, port: int, addresses: list[str], timeout: float):
        super().__init__(host, port, timeout=timeout)
        self.addresses = addresses

    def connect(self) -> None:
        self.sock = _open_socket(self.addresses, self.port, self.timeout)


class _PinnedHTTPS(http.client.HTTPSConnection):
    """HTTPS pinned like :class:`_PinnedHTTP`; the certificate is verified against ``host``."""

    def __init__(self, host: str, port: int, addresses: list[str], timeout: float):
        super().__init__(host, port, timeout=timeout, context=ssl.create_default_context())
        self.addresses = addresses

    def connect(self) -> None:
        sock = _open_socket(self.addresses, self.port, self.timeout)
        self.sock = self._context.wrap_socket(sock, server_hostname=self.host)


def _connection(target: Target, addresses: list[str], timeout: float) -> http.client.HTTPConnection:
    cls = _PinnedHTTPS if target.scheme == "https" else _PinnedHTTP
    return cls(target.host, target.port, addresses, timeout)


def _read_capped(resp: http.client.HTTPResponse, max_bytes: int, deadline: float) -> bytes:
    length = resp.getheader("Content-Length", "")
    if length.strip().isdigit() and int(length) > max_bytes:
        raise FetchError("too_large", f"Content-Length {int(length)} exceeds max_bytes {max_bytes}")
    buf = bytearray()
    while True:
        chunk = resp.read1(CHUNK)
        if not chunk:
            return bytes(buf)
        buf += chunk
        if len(buf) > max_bytes:
            raise FetchError("too_large", f"response exceeds max_bytes {max_bytes}")
        if time.monotonic() > deadline:
            raise FetchError("network_error", "timed out: response still streaming after the fetch deadline")


# ---------------------------------------------------------------------------------------------
# img2dataset hook (runs in img2dataset's spawned worker processes)
# ---------------------------------------------------------------------------------------------


def download_image(row: tuple[int, str], timeout: float, user_agent_token: str | None,
                   disallowed_header_directives: set[str] | None, *, policy: UrlPolicy,
                   limits: FetchLimits) -> tuple[int, io.BytesIO | None, str | None]:
    """Drop-in for ``img2dataset.downloader.download_image``: ``(key, stream | None, error | None)``."""
    from img2dataset.downloader import is_disallowed  # already imported in img2dataset's workers

    key, url = row
    agent = USER_AGENT
    if user_agent_token:
        agent += f" (compatible; {user_agent_token}; +https://github.com/rom1504/img2dataset)"
    try:
        resp = fetch(url, policy, replace(limits, timeout_s=timeout), user_agent=agent)
        if disallowed_header_directives and is_disallowed(resp.headers, user_agent_token,
                                                          disallowed_header_directives):
            return key, None, "Use of image disallowed by X-Robots-Tag directive"
        check_header(resp.body, limits.max_pixels)
        # img2dataset's resizer (OpenCV) saturates 16-bit samples to white on encode: hand it 8 bits.
        body = eight_bit_png(resp.body, limits.max_pixels) or resp.body
        return key, io.BytesIO(body), None
    except FetchError as e:
        return key, None, str(e)
    except Exception as e:  # one bad row must never end the shard
        return key, None, f"other: {type(e).__name__}: {e}"


def check_header(data: bytes, max_pixels: int) -> None:
    """Refuse bytes whose image header is unreadable or announces more than ``max_pixels``.

    Only the header is parsed. An image PIL cannot identify is refused too: cv2 would decode it
    without any size known beforehand."""
    try:
        open_image(data, max_pixels).close()
    except BadImage as e:
        raise FetchError(e.reason, str(e).split(": ", 1)[-1]) from None


_BASE_RSS_MB: float | None = None  # this worker's resident set before its first shard


def rss_mb() -> float:
    """Current resident set of this process (Linux /proc; else the peak so far)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20
    except (OSError, ValueError, IndexError):
        return peak_rss_mb()


def peak_rss_mb() -> float:
    """Peak resident set of this process since it started its program.

    Linux: ``VmHWM`` of /proc/self/status. Not ``getrusage``'s ``ru_maxrss``: that high-water mark
    survives ``execve``, so a spawned worker would report its parent's size at the fork.
    """
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 2**10  # kB
    except (OSError, ValueError, IndexError):
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


class GuardedDownloader:
    """img2dataset's ``Downloader`` with :func:`download_image` installed in the process running it.

    ``in_process``: the shard runs in the calling process (see :func:`img2dataset_guard`), so
    the peak RSS is reset before each shard (Linux ``clear_refs``) and measured from there."""

    def __init__(self, inner: Any, policy: UrlPolicy, limits: FetchLimits, report_dir: str, in_process: bool = False):
        self.inner, self.policy, self.limits, self.report_dir = inner, policy, limits, report_dir
        self.in_process = in_process

    def __call__(self, row: tuple[int, str]) -> Any:
        global _BASE_RSS_MB
        import img2dataset.downloader as d

        if not (hasattr(d, "download_image") and hasattr(d, "download_image_with_retry")):
            raise RuntimeError("this img2dataset has no downloader.download_image: the fetch guard cannot be installed")
        d.download_image = functools.partial(download_image, policy=self.policy, limits=self.limits)
        if self.in_process:
            reset_peak_rss()
            base = rss_mb()
        else:
            if _BASE_RSS_MB is None:
                _BASE_RSS_MB = rss_mb()
            base = _BASE_RSS_MB
        result = self.inner(row)
        report = {"pid": os.getpid(), "shard": int(row[0]), "base_rss_mb": round(base, 1),
                  "peak_rss_mb": round(peak_rss_mb(), 1)}
        os.makedirs(self.report_dir, exist_ok=True)
        with open(os.path.join(self.report_dir, f"{int(row[0]):05d}-{os.getpid()}.json"), "w") as f:
            json.dump(report, f)
        return result


def reset_peak_rss() -> None:
    """Reset this process's ``VmHWM`` to its current RSS (Linux ≥ 4.0); a no-op elsewhere."""
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")


class _NoLogger:
    """Stands in for img2dataset's ``LoggerProcess`` in-process: that is a spawned process (a
    second interpreter importing torch, seconds per call) that only prints aggregate speeds;
    the stage reads the per-shard status parquet and ``_stats.json`` itself."""

    def __init__(self, *args: Any, **kwargs: Any):
        self.done_shards: set[int] = set()

    def start(self) -> None:
        pass

    def join(self, timeout: float | None = None) -> None:
        pass

    def terminate(self) -> None:
        pass


def in_process_distributor(processes_count: int, downloader: Callable, reader: Any, subjob_size: int,
                           max_shard_retry: int) -> None:
    """img2dataset's ``multiprocessing_distributor`` without the pool: every shard runs in this
    process, one after another (its downloads still use ``thread_count`` threads). Same retry
    rule: a failed shard is retried up to ``max_shard_retry`` times."""
    failed = [row for row in reader if not downloader(row)[0]]
    for _ in range(max_shard_retry):
        if not failed:
            break
        failed = [row for row in failed if not downloader(row)[0]]


@contextlib.contextmanager
def img2dataset_guard(policy: UrlPolicy, limits: FetchLimits, report_dir: str,
                      in_process: bool = False) -> Iterator[None]:
    """While active, ``img2dataset.download`` fetches through :func:`download_image` in its workers.

    Patches ``img2dataset.main.Downloader`` in this process only for the duration (a Ray task
    runs one partition at a time); spawned workers get the guard through the pickled downloader.

    ``in_process``: no worker processes at all. img2dataset's spawned pool and logger process
    are replaced by :func:`in_process_distributor` and :class:`_NoLogger`, so the shards run in
    the calling process (a Ray worker that has img2dataset imported already: no interpreter
    start and no torch import per call, which cost seconds of every partition). Everything
    patched (its download function, its SIGINT handler) is put back on exit.
    """
    # not `import img2dataset.main`: the package rebinds that name to its `main` function
    main = importlib.import_module("img2dataset.main")
    dl = importlib.import_module("img2dataset.downloader")
    saved = {"Downloader": main.Downloader, "multiprocessing_distributor": main.multiprocessing_distributor,
             "LoggerProcess": main.LoggerProcess}
    saved_fetch = dl.download_image
    old_env = os.environ.get("OPENCV_IO_MAX_IMAGE_PIXELS")
    old_sigint = signal.getsignal(signal.SIGINT) if threading.current_thread() is threading.main_thread() else None
    main.Downloader = lambda **kw: GuardedDownloader(saved["Downloader"](**kw), policy, limits, report_dir,
                                                     in_process)
    if in_process:
        main.multiprocessing_distributor = in_process_distributor
        main.LoggerProcess = _NoLogger
    os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = str(limits.max_pixels)  # read by cv2 at import in the workers
    try:
        yield
    finally:
        for name, value in saved.items():
            setattr(main, name, value)
        dl.download_image = saved_fetch
        if old_sigint is not None:
            signal.signal(signal.SIGINT, old_sigint)
        if old_env is None:
            os.environ.pop("OPENCV_IO_MAX_IMAGE_PIXELS", None)
        else:
            os.environ["OPENCV_IO_MAX_IMAGE_PIXELS"] = old_env


def worker_memory(report_dir: str) -> dict[str, float | None]:
    """Peak RSS over the worker processes that reported, and the base RSS of the worker with that peak."""
    reports = []
    if os.path.isdir(report_dir):
        for fn in sorted(os.listdir(report_dir)):
            with open(os.path.join(report_dir, fn)) as f:
                reports.append(json.load(f))
    if not reports:
        return {"peak_rss_mb": None, "base_rss_mb": None}
    top = max(reports, key=lambda r: r["peak_rss_mb"])
    return {"peak_rss_mb": top["peak_rss_mb"], "base_rss_mb": top["base_rss_mb"]}
