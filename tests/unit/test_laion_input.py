"""Real LAION input, safely: the urls stage on LAION's own parquet layout (upper-case columns,
scores, null and duplicate URLs), one-line errors for a source that is not parquet and for a
misspelt key, a relative run.root refused under a remote Ray, and a local Ray that leaves no
~/.ray/auth_token behind. No Ray cluster is started."""

from __future__ import annotations

import os
import subprocess
import sys

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from data_prep import stages as data_stages
from data_prep import urls
from pipeline import config as C
from pipeline.store import Store
from tests.conftest import REPO
from workflows import full_pipeline as fp

DATA_CFGS = {s.name: s.config for s in data_stages.STAGES}


def laion_table() -> pa.Table:
    """LAION-2B / laion-aesthetic columns as published: no sample_id, upper-case URL/TEXT."""
    return pa.table({
        "URL": ["http://127.0.0.1:9/a.jpg", None, "", "   ", "http://127.0.0.1:9/a.jpg", " http://127.0.0.1:9/b.jpg ",
                "http://127.0.0.1:9/c.jpg"],
        "TEXT": ["a cat", "null url", "empty url", "blank url", "a cat again", "padded url", None],
        "WIDTH": pa.array([640, 1, 2, 3, 640, 800, 512], pa.int32()),
        "HEIGHT": pa.array([480, 1, 2, 3, 480, 600, 512], pa.int32()),
        "similarity": [0.31, 0.2, 0.2, 0.2, 0.31, 0.28, 0.35],
        "punsafe": [0.01, 0.5, 0.5, 0.5, 0.01, 0.02, None],
        "pwatermark": [0.1, 0.9, 0.9, 0.9, 0.1, 0.2, 0.3],
        "AESTHETIC_SCORE": [5.5, 4.0, 4.0, 4.0, 5.5, 6.1, 4.9],
        "hash": pa.array([11, 12, 13, 14, 11, 15, 16], pa.int64()),
        "__index_level_0__": list(range(7)),
    })


def run_urls(root, source, **cfg):
    """The urls stage with the config built as the CLI builds it (validation included)."""
    config = C.build(urls.UrlsConfig, {"source": str(source), **cfg}, "stages.urls")
    art = Store(str(root)).artifact("urls", "k")
    counts = urls.run({}, config, art)
    return counts, pq.read_table(art.child(urls.URLS_FILE)), pq.read_table(art.child(urls.REJECTED_FILE))


def test_laion_parquet_with_default_config(tmp_path):
    src = tmp_path / "part-00000.parquet"
    pq.write_table(laion_table(), src)
    counts, table, rejected = run_urls(tmp_path / "r1", src)

    assert counts["rows_in"] == 7 and counts["rows_out"] == counts["rows"] == 4 and counts["dropped"] == 3
    assert counts["dropped_by_reason"] == {"url_missing": 3}
    assert counts["duplicate_sample_ids"] == 0
    assert counts["columns"] == {"url": "URL", "caption": "TEXT", "laion_similarity": "similarity",
                                 "laion_punsafe": "punsafe", "laion_pwatermark": "pwatermark",
                                 "laion_aesthetic": "AESTHETIC_SCORE"}
    assert table.column_names[:7] == ["url", "caption", "sample_id", "laion_similarity", "laion_punsafe",
                                      "laion_pwatermark", "laion_aesthetic"]
    assert {"WIDTH", "HEIGHT", "hash"} <= set(table.column_names)  # the rest carried as is
    assert not any(c.startswith("__index_level") for c in table.column_names)
    for c in ("laion_similarity", "laion_punsafe", "laion_pwatermark", "laion_aesthetic"):
        assert table.schema.field(c).type == pa.float32()
    assert table.column("url").to_pylist() == ["http://127.0.0.1:9/a.jpg", "http://127.0.0.1:9/a.jpg",
                                               "http://127.0.0.1:9/b.jpg", "http://127.0.0.1:9/c.jpg"]
    assert table.column("laion_aesthetic").to_pylist()[2] == pytest.approx(6.1)
    assert table.column("laion_punsafe").to_pylist()[3] is None  # a missing score stays missing
    ids = table.column("sample_id").to_pylist()
    assert len(set(ids)) == 4 and ids[0] != ids[1]  # the duplicate URL has its own id

    # The dropped rows are kept, with their reason and where they came from.
    assert rejected.column("reason").to_pylist() == ["url_missing"] * 3
    assert rejected.column("source_row").to_pylist() == [1, 2, 3]
    assert rejected.column("source_file").to_pylist() == ["part-00000.parquet"] * 3
    assert rejected.column("caption").to_pylist() == ["null url", "empty url", "blank url"]

    # A rerun (another root, same source) gives the same ids, row for row.
    _, again, _ = run_urls(tmp_path / "r2", src)
    assert again.equals(table)


def test_given_ids_made_unique_and_directory_sources(tmp_path):
    src = tmp_path / "laion400m"
    src.mkdir()
    pq.write_table(pa.table({"URL": ["http://h/1", "http://h/2", "http://h/3", "http://h/4"],
                             "caption": ["1", "2", "3", "4"], "SAMPLE_ID": pa.array([7, 7, None, 8], pa.int64())}),
                   src / "part-0.parquet")
    pq.write_table(pa.table({"url": ["http://h/5", "http://h/6"], "TEXT": ["5", "6"],
                             "SAMPLE_ID": pa.array([8, 9], pa.int64())}), src / "part-1.parquet")
    (src / "_SUCCESS").write_text("")  # Spark's marker files are not parquet and are skipped
    counts, table, _ = run_urls(tmp_path / "r", src)
    ids = table.column("sample_id").to_pylist()
    assert ids[:2] == ["7", "7~1"] and ids[3:] == ["8", "8~1", "9"]
    assert ids[2] != "None" and len(set(ids)) == 6  # a null id gets a derived one
    assert counts["duplicate_sample_ids"] == 2 and counts["rows"] == 6
    assert run_urls(tmp_path / "r2", src)[1].column("sample_id").to_pylist() == ids
    # limit keeps the first N input rows, across files in sorted order
    counts, table, _ = run_urls(tmp_path / "r3", src, limit=5)
    assert counts["rows_in"] == 5 and table.column("url").to_pylist()[-1] == "http://h/5"


@pytest.mark.parametrize("kind", ["csv", "random_bytes", "empty_dir", "dir_of_csv"])
def test_non_parquet_source_is_one_line(tmp_path, kind):
    path = {"csv": tmp_path / "laion.csv", "random_bytes": tmp_path / "laion.parquet",
            "empty_dir": tmp_path / "empty", "dir_of_csv": tmp_path / "csvs"}[kind]
    if kind == "csv":
        path.write_text("URL,TEXT\nhttp://h/1,one\n")
    elif kind == "random_bytes":
        path.write_bytes(os.urandom(2048))
    else:
        path.mkdir()
        if kind == "dir_of_csv":
            (path / "part-0.csv").write_text("URL,TEXT\nhttp://h/1,one\n")
    with pytest.raises(C.ConfigError) as e:
        C.load(None, [f"run.root={tmp_path}/root", f"urls.source={path}"], DATA_CFGS)
    msg = str(e.value)
    assert msg.startswith(f"stages.urls.source: {path} is not a parquet file (") and "\n" not in msg


def test_missing_or_mistyped_columns_name_the_key(tmp_path):
    src = tmp_path / "x.parquet"
    pq.write_table(pa.table({"link": ["http://h/1"], "TEXT": ["one"]}), src)
    with pytest.raises(C.ConfigError, match=r"^stages\.urls\.url_col: .*x\.parquet has no column 'url' in any case "
                                            r"\(columns: link, TEXT\); set stages\.urls\.url_col$"):
        C.load(None, [f"urls.source={src}"], DATA_CFGS)
    counts, table, _ = run_urls(tmp_path / "r", src, url_col="link")
    assert table.column("url").to_pylist() == ["http://h/1"] and counts["columns"]["url"] == "link"
    pq.write_table(pa.table({"URL": ["http://h/1"], "TEXT": ["one"], "punsafe": ["high"]}), src)
    with pytest.raises(C.ConfigError, match=r"^stages\.urls\.source: column 'punsafe' \(laion_punsafe\) .* number"):
        C.load(None, [f"urls.source={src}"], DATA_CFGS)


@pytest.mark.parametrize("override, message", [
    ("download.image_sise=3", "stages.download.image_sise: unknown key (did you mean 'image_size'?; known keys: "),
    ("downlod.threads=1", "stages.downlod: unknown stage (did you mean 'download'?; known stages: download, "),
    ("stages.urls.URL_COL=x", "stages.urls.URL_COL: unknown key (did you mean 'url_col'?; "),
    ("rn.root=x", "rn: unknown section (did you mean 'run'?; known sections: ray, run, stages)"),
    ("zzz.n=1", "stages.zzz: unknown stage (known stages: "),
])
def test_unknown_names_get_a_did_you_mean(override, message):
    with pytest.raises(C.ConfigError) as e:
        C.load(None, [override], DATA_CFGS)
    assert str(e.value).startswith(message) and "\n" not in str(e.value)


def test_top_level_yaml_sections(tmp_path):
    cfg = tmp_path / "c.yaml"
    cfg.write_text("stage: {urls: {n: 3}}\n")
    with pytest.raises(C.ConfigError, match=r"^stage: unknown section \(did you mean 'stages'\?; known sections"):
        C.load(str(cfg), [], DATA_CFGS)
    cfg.write_text("urls: {n: 3}\n")
    with pytest.raises(C.ConfigError, match=r"^urls: a stage's settings go under 'stages:' \(stages\.urls\)$"):
        C.load(str(cfg), [], DATA_CFGS)


@pytest.mark.parametrize("root, env, address, refused", [
    ("runs/demo", {"RAY_ADDRESS": "10.0.0.5:6379"}, None, "remote"),
    ("runs/demo", {}, "ray://head-svc:10001", "remote"),
    ("runs/demo", {"RAY_ADDRESS": "http://10.0.0.5:8265"}, None, "remote"),
    ("runs/demo", {"RAY_JOB_CONFIG_JSON_ENV_VAR": '{"runtime_env": {"working_dir": "gcs://_ray_pkg_1.zip"}}',
                   "RAY_ADDRESS": "127.0.0.1:6379"}, None, "job"),
    ("runs/demo", {}, None, None),  # local Ray started by the pipeline
    ("runs/demo", {"RAY_ADDRESS": "127.0.0.1:6379"}, None, None),  # a head on this machine
    ("runs/demo", {}, "auto", None),
    ("/shared/runs/demo", {"RAY_ADDRESS": "10.0.0.5:6379"}, None, None),  # a shared filesystem
    ("s3://bucket/run", {"RAY_ADDRESS": "10.0.0.5:6379"}, None, None),
])
def test_relative_root_under_a_remote_cluster_is_refused(root, env, address, refused):
    cfg = C.load(None, [f"run.root={root}", f"ray.address={address}" if address else "ray.num_cpus=1"], DATA_CFGS)
    if refused is None:
        C.check_run_root(cfg, env)
        return
    with pytest.raises(C.ConfigError) as e:
        C.check_run_root(cfg, env)
    msg = str(e.value)
    assert msg.startswith(f"run.root: relative path {root!r} under ") and "\n" not in msg
    assert msg.endswith("and lost; use s3://... or an absolute path every node shares")
    assert ("under a remote Ray cluster" in msg) == (refused == "remote")


def test_cli_refuses_relative_root_under_remote_address_before_any_work(tmp_path, monkeypatch, capsys):
    # In-process main(): the CLI's own exit path is tested through a subprocess in test_backbone_e2e.py.
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("RAY_ADDRESS", "10.255.0.1:6379")
    rc = fp.main(["--config", str(REPO / "workflows" / "configs" / "demo.yaml"), "--dry-run"])
    out, err = capsys.readouterr()
    assert rc == 2, out + err
    assert err.strip().splitlines() == [
        "error: run.root: relative path 'runs/demo' under a remote Ray cluster (RAY_ADDRESS=10.255.0.1:6379) would "
        "be written inside the job's working dir on the head node and lost; use s3://... or an absolute path every "
        "node shares"]
    assert "plan:" not in out and not (tmp_path / "runs").exists()


@pytest.mark.parametrize("env, token_file, sets_token", [
    ({}, False, True),  # Ray would write ~/.ray/auth_token: give it a token that lives in the env only
    ({"RAY_AUTH_MODE": "token"}, False, True),
    ({"RAY_AUTH_MODE": "disabled"}, False, False),  # the user's choice (and the tests')
    ({"RAY_AUTH_TOKEN": "t"}, False, False),
    ({"RAY_AUTH_TOKEN_PATH": "/some/file"}, False, False),
    ({}, True, False),  # the user's own token file is used as is
])
def test_local_ray_auth_env(tmp_path, env, token_file, sets_token):
    if token_file:
        (tmp_path / ".ray").mkdir()
        (tmp_path / ".ray" / "auth_token").write_text("mine")
    extra = fp.local_ray_auth_env(env, str(tmp_path))
    assert (set(extra) == {"RAY_AUTH_TOKEN"}) == sets_token and not extra.keys() - {"RAY_AUTH_TOKEN"}
    if sets_token:
        assert len(extra["RAY_AUTH_TOKEN"]) == 64 and extra != fp.local_ray_auth_env(env, str(tmp_path))


def test_ray_token_setup_writes_no_token_file_with_that_env(tmp_path):
    """What ``ray.init()`` does for a new local cluster before starting it (Ray 2.60,
    ``ray/_private/worker.py``), in a child process with its own HOME: without the env it writes
    ~/.ray/auth_token (the bug), with ``local_ray_auth_env`` it writes nothing."""
    code = ("from ray._private.authentication.authentication_token_setup import enable_token_auth_by_default, "
            "ensure_token_if_auth_enabled; enable_token_auth_by_default(); "
            "ensure_token_if_auth_enabled({}, create_token_if_missing=True)")
    base = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    procs = {}
    for case in ("plain", "fixed"):
        home = tmp_path / case
        home.mkdir()
        extra = fp.local_ray_auth_env(base, str(home)) if case == "fixed" else {}
        procs[case] = subprocess.Popen([sys.executable, "-c", code], env={**base, **extra, "HOME": str(home)},
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for p in procs.values():
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0, out
    assert (tmp_path / "plain" / ".ray" / "auth_token").exists()  # Ray's default: the file appears
    assert not (tmp_path / "fixed" / ".ray").exists()
