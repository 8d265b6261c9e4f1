"""The autoscaler config of ``cluster/aws.yaml`` for Ray's fake multi-node provider, scaled to one
small machine, so that a test can watch the real autoscaler (Ray's ``monitor.py``, v1) start and
release the cluster YAML's node types.

Ray's provider (``ray/autoscaler/_private/fake_multi_node/node_provider.py``, type
``fake_multinode``) "launches" a node by starting another raylet on this machine
(``ray._private.node.Node`` inside the autoscaler's monitor process) with the node type's
declared resources and labels, and terminates it by killing those processes. Its head node's type
is hard-coded as ``ray.head.default`` and it needs ``RAY_FAKE_CLUSTER=1`` in the head's
environment. ``ray.cluster_utils.AutoscalingCluster`` would build this config from the provider's
``example.yaml``, but that file is not in Ray 2.60's wheel, and its ``start()`` runs
``ray stop --force`` (every Ray on the machine): this module writes the whole config itself.

Scaling (``scale_resources``): CPUs ÷ 16 and GPUs ÷ 4, rounded up, so every type keeps at least one
of each resource it declares and the types stay distinguishable by what they offer (cpu_data
2 CPUs; gpu_encode 1 CPU + 1 GPU; gpu_train 12 CPUs + 2 GPUs); the head keeps its ``CPU: 0``.
Declared GPUs are only numbers to Ray: on a CPU-only machine the code that gets one must run on
the CPU. Node counts are capped (``max_workers``) so that a test never starts more raylets than
two cores carry.

This lives with the tests, not in ``cluster/``: it is a test fixture's input (127.0.0.1, short
idle timeout, small object stores), not something to deploy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import yaml

# The fake provider tags its head with this type (FAKE_HEAD_NODE_TYPE); the config must use it.
FAKE_HEAD_TYPE = "ray.head.default"
CPU_DIVISOR = 16
GPU_DIVISOR = 4


def scale_resources(resources: dict[str, Any], cpu_divisor: float = CPU_DIVISOR,
                    gpu_divisor: float = GPU_DIVISOR) -> dict[str, float]:
    """A node type's resources on this machine: CPU and GPU divided and rounded up (a type with one
    keeps at least one; zero stays zero), every other resource as declared."""
    out: dict[str, float] = {}
    for k, v in resources.items():
        if not isinstance(v, (int, float)) or v < 0:
            raise ValueError(f"resources.{k}: expected a number >= 0, got {v!r}")
        div = {"CPU": cpu_divisor, "GPU": gpu_divisor}.get(k)
        out[k] = math.ceil(v / div) if div and v > 0 else v
    return out


def fake_autoscaler_config(cluster_yaml: str | Path, gcs_address: str, *, max_workers_per_type: int = 1,
                           max_workers: int = 3, idle_timeout_minutes: float = 0.25,
                           upscaling_speed: float = 100.0, object_store_bytes: int = 300 * 2**20,
                           cpu_divisor: float = CPU_DIVISOR, gpu_divisor: float = GPU_DIVISOR) -> dict[str, Any]:
    """The ``--autoscaling-config`` of a fake cluster with the worker node types of ``cluster_yaml``.

    Each worker type keeps its name, labels and ``min_workers``; its resources are scaled
    (``scale_resources``) plus an object store of ``object_store_bytes``; ``max_workers`` is capped
    at ``max_workers_per_type``. The head type becomes ``ray.head.default`` with the YAML head's
    resources (``CPU: 0`` in ``cluster/aws.yaml``). ``gcs_address`` is the head's own port: without
    it the provider joins new nodes to ``<this machine's IP>:6379``.

    Defaults: one node per type, so that bursts of CPU demand (Ray Data's pending actors) cannot
    flood two cores with raylets; a 15 s idle timeout, short enough that the release shows within
    seconds of the job's end, long enough that a node is not released between two stages that use
    it (at 6 s, nodes were released and started again between stages, ~10 s each on 2 cores).
    """
    path = Path(cluster_yaml)
    try:
        spec = yaml.safe_load(path.read_text()) or {}
    except OSError as e:
        raise ValueError(f"{path}: cannot read ({e.strerror})") from e
    types = spec.get("available_node_types") or {}
    head = spec.get("head_node_type")
    if head not in types:
        raise ValueError(f"{path}: head_node_type {head!r} is not one of available_node_types {sorted(types)}")
    workers: dict[str, Any] = {}
    for name, t in types.items():
        if name == head:
            continue
        res = scale_resources(t.get("resources") or {}, cpu_divisor, gpu_divisor)
        workers[name] = {
            "resources": {**res, "object_store_memory": object_store_bytes},
            "labels": dict(t.get("labels") or {}),
            "node_config": {},
            "min_workers": int(t.get("min_workers", 0)),
            "max_workers": min(int(t.get("max_workers", 0)), max_workers_per_type),
        }
    if not workers:
        raise ValueError(f"{path}: no worker node types besides the head {head!r}")
    head_res = scale_resources(types[head].get("resources") or {}, cpu_divisor, gpu_divisor)
    return {
        "cluster_name": f"{spec.get('cluster_name', 'cluster')}-fake",
        "max_workers": max_workers,
        "upscaling_speed": upscaling_speed,
        "idle_timeout_minutes": idle_timeout_minutes,
        "provider": {
            "type": "fake_multinode",
            "gcs_address": gcs_address,
            # The provider's node ids double as IPs: the autoscaler matches its nodes to Ray's by id.
            "use_node_id_as_ip": True,
            "disable_node_updaters": True,
            "disable_launch_config_check": True,
        },
        "head_node_type": FAKE_HEAD_TYPE,
        "available_node_types": {FAKE_HEAD_TYPE: {"resources": {**head_res, "object_store_memory": object_store_bytes},
                                                  "node_config": {}, "max_workers": 0},
                                 **workers},
        # The monitor reads this file as is (no `ray up` fills in defaults): every key it touches.
        "auth": {}, "docker": {}, "file_mounts": {}, "cluster_synced_files": [],
        "file_mounts_sync_continuously": False, "rsync_exclude": [], "rsync_filter": [],
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [],
        "worker_setup_commands": [], "head_start_ray_commands": [], "worker_start_ray_commands": [],
    }
