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
def ray_head(num_cpus: int = 4, temp_root: str | None = None):
    """A real Ray head node on 127.0.0.1 with a job server, stopped on exit.

    ``ray start --block`` tears down exactly the processes it started when terminated, so
    tests never need the machine-wide ``ray stop`` (which would kill other Ray sessions).
    """
    import tempfile

    port, dash = free_port(), free_port()
    # Ray's socket paths must stay short (AF_UNIX limit), so keep the temp dir near /tmp.
    temp_dir = tempfile.mkdtemp(prefix="ray-", dir=temp_root or "/tmp")
    # Job entrypoints say plain `python`: it must be this interpreter (the venv's), as under test.sh.
    env = {**node_env(), "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    ray_bin = str(Path(sys.executable).with_name("ray"))
    proc = subprocess.Popen(
        [ray_bin, "start", "--head", "--block", "--node-ip-address=127.0.0.1", f"--port={port}",
         f"--num-cpus={num_cpus}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
         # Own agent ports: another Ray on the machine (a demo run) must not hold ours.
         f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True)
    address = f"127.0.0.1:{port}"
    dashboard = f"http://127.0.0.1:{dash}"
    try:
        import urllib.request

        deadline = time.time() + 120
        while True:
            try:
                urllib.request.urlopen(dashboard + "/api/version", timeout=2).read()
                break
            except OSError:
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError("ray head did not come up") from None
                time.sleep(1)
        _wait_for_job_agent(dashboard, deadline)
        yield {"address": address, "dashboard": dashboard, "temp_dir": temp_dir}
    finally:
        _stop(proc)


def _stop(proc: subprocess.Popen, grace_s: float = 10) -> None:
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
def ray_worker_node(address: str, num_cpus: int = 2):
    """A second raylet on 127.0.0.1 joined to the head at ``address``: another Ray node, as on a
    cluster (own temp dir and ports), stopped on exit. Yields its temp dir."""
    import tempfile

    temp_dir = tempfile.mkdtemp(prefix="ray-", dir="/tmp")
    ray_bin = str(Path(sys.executable).with_name("ray"))
    cmd = [ray_bin, "start", "--block", f"--address={address}", "--node-ip-address=127.0.0.1",
           f"--num-cpus={num_cpus}", f"--temp-dir={temp_dir}", "--disable-usage-stats",
           f"--dashboard-agent-listen-port={free_port()}", f"--metrics-export-port={free_port()}",
           f"--runtime-env-agent-port={free_port()}", f"--node-manager-port={free_port()}",
           f"--object-manager-port={free_port()}"]
    proc = subprocess.Popen(cmd, env=node_env(), stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
        start_new_session=True)
    try:
        yield temp_dir
    finally:
        _stop(proc)


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
    HTTP 500 'No available agent'. Submit a no-op job until one is accepted and has finished."""
    from ray.job_submission import JobSubmissionClient

    client = JobSubmissionClient(dashboard)
    while True:
        try:
            job = client.submit_job(entrypoint="true")
            break
        except RuntimeError as e:
            if "No available agent" not in str(e) or time.time() > deadline:
                raise
            time.sleep(1)
    while not client.get_job_status(job).is_terminal():
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
