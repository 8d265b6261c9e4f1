"""Cluster files: the launcher YAML validates against the schema Ray ships; the rest parse and say what we rely on."""

import json
from pathlib import Path

import jsonschema
import ray.autoscaler
import yaml

CLUSTER = Path(__file__).resolve().parents[2] / "cluster"


def test_aws_launcher_yaml_matches_rays_schema():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    schema = json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())
    jsonschema.validate(cfg, schema)  # raises with the offending path on any mismatch
    from ray.autoscaler._private.util import prepare_config, validate_config

    # What `ray up` does: fill provider defaults, then Ray's own checks beyond the schema.
    validate_config(prepare_config(cfg))


def test_aws_launcher_autoscaling_shape():
    cfg = yaml.safe_load((CLUSTER / "aws.yaml").read_text())
    types = cfg["available_node_types"]
    assert types[cfg["head_node_type"]]["resources"] == {"CPU": 0}
    workers = {k: v for k, v in types.items() if k != cfg["head_node_type"]}
    assert {"cpu_data", "gpu_encode", "gpu_train"} <= set(workers)
    assert all(v["min_workers"] == 0 for v in workers.values())
    assert types["cpu_data"]["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot"
    assert types["gpu_train"]["resources"]["GPU"] == 8
    assert cfg["idle_timeout_minutes"] > 0
    assert any("pip install" in c and "genmodels" in c for c in cfg["setup_commands"])
    # Infrastructure only: no model hyperparameters leak into the cluster file.
    text = (CLUSTER / "aws.yaml").read_text()
    assert not any(word in text for word in ("lr:", "batch_size", "total_steps"))


def test_rayjob_manifest():
    job = yaml.safe_load((CLUSTER / "rayjob.yaml").read_text())
    assert job["kind"] == "RayJob" and job["apiVersion"].startswith("ray.io/")
    spec = job["spec"]
    assert "workflows/full_pipeline.py" in spec["entrypoint"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["backoffLimit"] >= 1
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    groups = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert all(g["minReplicas"] == 0 for g in groups)
    assert spec["rayClusterSpec"]["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0"


def test_runtime_env_is_valid_for_ray():
    from ray.runtime_env import RuntimeEnv

    env = yaml.safe_load((CLUSTER / "runtime_env.yaml").read_text())
    RuntimeEnv(**env)  # Ray validates the fields
    assert ".venv" in env["excludes"]
