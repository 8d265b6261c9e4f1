"""Offline demo dataset: a LAION-style URL parquet served from a loopback HTTP server.

A real run starts from LAION parquet files (``url``, ``caption``) and downloads them with
img2dataset. The demo must run with no internet, so this package makes a small image "web
site" of its own and the URL parquet that points at it:

    items = list(generate(200, seed=0)) + broken_items()
    rows = write_site(fs, root, items)              # root/images/<sample_id>.<ext>
    with serve(fs, root) as base_url:               # http://127.0.0.1:<port>
        write_url_parquet(rows, base_url, fs, path) # url, caption, sample_id, expected, ...
        img2dataset.download(url_list=path, input_format="parquet", ...)

Images are coloured geometric shapes whose captions are written from the recorded drawing
spec (:mod:`.shapes`), plus the real photographs that ship inside scikit-image and
scikit-learn (:mod:`.photos`), mixed by :func:`generate` (:mod:`.catalog`). :func:`broken_items`
(:mod:`.broken`) adds the failures a web crawl meets (404, corrupt and truncated files, tiny
images, odd captions) so the pipeline's filtering is exercised too. :mod:`.site` writes and
serves the files, :mod:`.url_list` writes the parquet, :mod:`.cli` does both from the shell.
Everything is deterministic in ``seed``: same seed, byte-identical files.

No Ray here: this is plain data generation plus a test server.
"""

from data_prep.demo.broken import BROKEN_REASONS, broken_items
from data_prep.demo.catalog import generate
from data_prep.demo.item import OK, DemoItem, Shape
from data_prep.demo.shapes import SCENES
from data_prep.demo.site import serve, write_site
from data_prep.demo.url_list import URL_SCHEMA, write_url_parquet

__all__ = ["BROKEN_REASONS", "OK", "SCENES", "URL_SCHEMA", "DemoItem", "Shape", "broken_items", "generate", "serve",
           "write_site", "write_url_parquet"]
