"""Test-wide settings: offline hubs, one torch thread, loopback-only services.

Set at import time so that every library imported later (huggingface_hub, albumentations,
boto3) sees them, exactly as the demo does.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.1")
# Ray 2.60 turns on token auth once any local ray.init() has left ~/.ray/auth_token behind; the
# tests' clusters listen on 127.0.0.1 only, so pin the mode instead of depending on $HOME.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
os.environ.setdefault("WANDB_MODE", "disabled")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Ray Data 2.60 starts 32 footer-reading actors per Parquet read; the tests' reads have a few files
# (the demo sets the same in its config). Inherited by every Ray node the tests start.
os.environ.setdefault("RAY_DATA_PARQUET_FOOTER_NUM_ACTORS", "2")
# A driver with usage stats on starts Ray Data's usage-collection actor and hands it every execution:
# 13 CPU-s and one more worker process in a CI run (the heads' --disable-usage-stats reaches no driver).
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import torch  # noqa: E402

# Tiny models on a 2-core machine: more threads only add contention between test workers.
torch.set_num_threads(1)


import contextlib  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def node_env() -> dict[str, str]:
    """The environment for a Ray node or a `ray` CLI call of a cluster other than the session's.

    Without ``RAY_ADDRESS``: the session fixture sets it to its own head, and a node started with
    it passes it on to its job drivers, which would then join the session's cluster instead of theirs.
    ``PATH`` starts with this interpreter's bin: job entrypoints say plain ``python``.
    """
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + os.environ.get("PATH", "")
    return env


@contextlib.contextmanager
def ray_head(num_cpus: int = 4, temp_root: str | None = None, extra_args: tuple[str, ...] = (),
             extra_env: dict[str, str] | None = None, port: int | None = None):
    """A real Ray head node on 127.0.0.1 with a job server, stopped on exit.

    ``ray start --block`` tears down exactly the processes it started when terminated, so
    tests never need the machine-wide ``ray stop`` (which would kill other Ray sessions).
    ``extra_args`` / ``extra_env`` go to that ``ray start`` (``fake_autoscaling_head``), ``port``
    is its GCS port (default: a free one); the yielded ``pid`` is its process group's.
    """
    import tempfile

    fixed_port = port
    # Ray's socket paths must stay short (AF_UNIX limit), so keep the temp dir near /tmp.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir=temp_root or "/tmp")
    # Job entrypoints say plain `python`: it must be this interpreter (the venv's), as under test.sh.
    env = {**node_env(), "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""), **(extra_env or {})}
    # Ray gives its dashboard 60 s to start; on 2 cores with two demo runs beside it, it took longer
    # and `ray start` failed three times. A slow machine should make the suite slow, not red.
    env.setdefault("RAY_DASHBOARD_STARTUP_TIMEOUT_S", "300")
    ray_bin = str(Path(sys.executable).with_name("ray"))
    proc = None
    try:
        import urllib.request

        # A head that exits during start-up (a chosen port taken before Ray binds it, another
        # Ray's processes starting beside it on a loaded machine) is started again on fresh ports.
        for attempt in range(1, 4):
            port, dash = fixed_port or free_port(), free_port()
            log = Path(temp_dir, f"ray_start_head_{attempt}.log")
            with open(log, "w") as out:
                proc = subprocess.Popen(
                    [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
                     f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
                     # Own agent ports: another Ray on the machine (a demo run) must not hold ours.
                     f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
                     *extra_args],
                    env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
            address = f"127.0.0.1:{port}"
            dashboard = f"http://127.0.0.1:{dash}"
            deadline = time.time() + 300
            while proc.poll() is None and time.time() < deadline:
                try:
                    urllib.request.urlopen(dashboard + "/api/version", timeout=2).read()
                    break
                except OSError:
                    time.sleep(1)
            else:
                _stop(proc)
                if attempt == 3:
                    raise RuntimeError("ray head did not come up:\n" + log.read_text()[-3000:])
                continue
            break
        _wait_for_job_agent(dashboard, deadline)
        yield {"address": address, "dashboard": dashboard, "temp_dir": temp_dir, "pid": proc.pid}
    finally:
        if proc is not None:
            _stop(proc)


def _stop(proc: subprocess.Popen, grace_s: float = 3) -> None:
    """SIGTERM to ``ray start --block`` (it stops what it started); if that takes longer than
    ``grace_s`` (it can wait ~30 s on busy workers), SIGKILL its whole process group, which holds
    exactly the processes of this node (started in a session of their own)."""
    import signal

    proc.terminate()
    try:
        proc.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)


@contextlib.contextmanager
def ray_worker_node(address: str, num_cpus: int = 2, attempts: int = 3, join_timeout_s: float = 180):
    """A second raylet on 127.0.0.1 joined to the head at ``address``: another Ray node, as on a
    cluster (own temp dir and ports), stopped on exit. Yields its temp dir.

    Waits until ``ray start`` reports the node started (it has registered with the head); a start
    that exits first (a port taken between choosing it and binding it, a registration timeout on a
    loaded machine) is retried with fresh ports, and the last one's output is in the error."""
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray_bin = str(Path(sys.executable).with_name("ray"))
    proc = None
    for attempt in range(1, attempts + 1):
        cmd = [ray_bin, "start", "--block", f"--address={address}", "--node-ip-address=127.0.0.1",
               f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
               f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
               f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}",
               f"--object-manager-port={free_port()}"]
        log = Path(temp_dir, f"ray_start_{attempt}.log")
        with open(log, "w") as out:
            proc = subprocess.Popen(cmd, env=node_env(), stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.time() + join_timeout_s
        while proc.poll() is None and "Ray runtime started" not in log.read_text() and time.time() < deadline:
            time.sleep(0.5)
        if proc.poll() is None and "Ray runtime started" in log.read_text():
            break
        _stop(proc)
        if attempt == attempts:
            raise RuntimeError(f"worker node did not join {address} in {attempts} attempts:\n"
                               + log.read_text()[-3000:])
    try:
        yield temp_dir
    finally:
        _stop(proc)


def submit_pipeline(dashboard: str, root: Path | str, stages: str, *overrides: str, timeout: float,
                    working_dir: str = str(REPO), port: int | None = None) -> subprocess.CompletedProcess:
    """``ray job submit --working-dir .`` of the demo config's ``stages`` (comma-separated) into
    ``root``, on 24 URLs served on ``port`` (default: a free one), with ``overrides`` (``key=value``); blocks until the
    job ends. The ``ray`` CLI runs without the session's RAY_ADDRESS (``node_env``).
    ``working_dir="local://<repo>"`` uses the checkout in place on every node (no upload)."""
    ray_bin = str(Path(sys.executable).with_name("ray"))
    return subprocess.run(
        [ray_bin, "job", "submit", "--address", dashboard, "--working-dir", working_dir, "--",
         "python", "workflows/full_pipeline.py", "--config", "workflows/configs/demo.yaml", f"run.root={root}",
         "--stages", stages, "urls.n=24", f"urls.port={port or free_port()}", *overrides],
        capture_output=True, text=True, timeout=timeout, cwd=REPO, env=node_env())


@contextlib.contextmanager
def fake_autoscaling_head(cluster_yaml: str | Path, tmp_path: Path, extra_env: dict[str, str] | None = None,
                          **config_kwargs):
    """A 0-CPU head whose autoscaler (Ray's v1 ``monitor.py``) starts and stops the worker node types
    of ``cluster_yaml`` as extra raylets on this machine (``tests/fake_autoscaler.py``), on 127.0.0.1,
    own ports and temp dir. Yields ``ray_head``'s dict plus ``config`` (the autoscaler config).
    ``extra_env`` reaches every process of the cluster (nodes, job drivers, workers).

    Never ``AutoscalingCluster.start()``: it runs the machine-wide ``ray stop --force``. The
    provider starts its nodes inside the monitor, a child of this head's ``ray start``, so they
    stay in its process group; stopping the head leaves them running (its ``ray start`` stops only
    what it started), so the group is killed afterwards.
    """
    import json
    import signal

    from tests.fake_autoscaler import fake_autoscaler_config

    port = free_port()
    config = fake_autoscaler_config(cluster_yaml, f"127.0.0.1:{port}", **config_kwargs)
    path = tmp_path / "autoscaler.json"
    path.write_text(json.dumps(config))
    head_res = config["available_node_types"]["ray.head.default"]["resources"]
    env = {
        "RAY_FAKE_CLUSTER": "1",  # the provider refuses to start without it
        "AUTOSCALER_UPDATE_INTERVAL_S": "1",  # the monitor's loop (default 5 s)
        # The provider starts nodes without a node IP: Ray would pick this machine's address; with
        # "clusters not enabled" it takes the loopback address, as every server here must.
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        **(extra_env or {}),
    }
    args = (f"--autoscaling-config={path}", f"--object-store-memory={head_res['object_store_memory']}")
    head = None
    try:
        with ray_head(num_cpus=head_res.get("CPU", 0), extra_args=args, extra_env=env, port=port) as head:
            yield {**head, "config": config}
    finally:
        if head is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(head["pid"], signal.SIGKILL)


@pytest.fixture
def moto_s3(monkeypatch):
    """A moto S3 server on 127.0.0.1 for one test, with AWS_ENDPOINT_URL and test credentials set;
    yields the endpoint URL. Tests create their own buckets."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=free_port(), verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    for k, v in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                 "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(k, v)
    try:
        yield endpoint
    finally:
        server.stop()


def _wait_for_job_agent(dashboard: str, deadline: float) -> None:
    """The dashboard answers before the head's job agent registers; until then a submission gets
    HTTP 500 'No available agent'. Submit a no-op job until one is accepted and has finished. On a
    loaded machine the starting dashboard may also drop the connection (``RemoteDisconnected``, seen
    with two demo runs beside CI on 2 cores): retried the same way, until ``deadline``."""
    import requests
    from ray.job_submission import JobSubmissionClient

    while True:
        try:
            client = JobSubmissionClient(dashboard)  # asks the dashboard for its version: may drop too
            job = client.submit_job(entrypoint="true")
            break
        except (RuntimeError, ConnectionError, requests.exceptions.ConnectionError) as e:
            # the SDK turns a refused version check into the builtin ConnectionError
            retry = not isinstance(e, RuntimeError) or "No available agent" in str(e)
            if not retry or time.time() > deadline:
                raise
            time.sleep(1)
    while True:
        try:
            if client.get_job_status(job).is_terminal():
                return
        except (ConnectionError, requests.exceptions.ConnectionError):
            pass  # a dropped poll: ask again
        if time.time() > deadline:
            raise RuntimeError("the no-op readiness job did not finish")
        time.sleep(0.5)


@pytest.fixture(scope="session")
def ray_cluster():
    """One Ray for the whole test session, connected in this process (Ray dislikes two per machine)."""
    import ray

    with ray_head() as head:
        os.environ["RAY_ADDRESS"] = head["address"]
        ray.init(address=head["address"], log_to_driver=False)
        try:
            yield head
        finally:
            ray.shutdown()
            os.environ.pop("RAY_ADDRESS", None)
