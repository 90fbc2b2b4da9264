"""The files in cluster/ are what a cluster starts from: each is checked here without a cloud.

- ``ray-cluster-aws.yaml`` against the JSON schema the installed Ray ships (what ``ray up`` validates),
  plus what the schema cannot know: acol-flow installed on every node, the autoscaler's IAM profile
  left to the head;
- ``rayjob.yaml`` for the fields KubeRay's RayJob needs (a structural check: no Kubernetes here);
- ``Dockerfile`` FROM the official Ray image of the installed Ray, with torch as pyproject pins it;
- ``runtime_env.yaml``: no pip install of the project (the working dir carries the code). The two-node
  tests (test_two_nodes.py) submit their jobs with it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
CLUSTER = REPO / "cluster"


def _yaml(name: str) -> Any:
    return yaml.safe_load((CLUSTER / name).read_text())


def _torch_pin() -> str:
    # (tomllib is 3.11+; the project supports 3.10)
    return re.search(r'^\s*"torch==([^"]+)"', (REPO / "pyproject.toml").read_text(), flags=re.M).group(1)


def test_ray_up_yaml_is_valid_for_the_installed_ray() -> None:
    ray = pytest.importorskip("ray")
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((Path(ray.__file__).parent / "autoscaler" / "ray-schema.json").read_text())
    config = _yaml("ray-cluster-aws.yaml")
    jsonschema.validate(config, schema)
    # the schema is strict enough to catch a misspelt key
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate({**config, "setup_command": []}, schema)


def test_ray_up_yaml_installs_acol_flow_on_every_node_and_keeps_the_autoscaler_profile() -> None:
    config = _yaml("ray-cluster-aws.yaml")
    # setup_commands run on the head and on every worker; the repository reaches them by file_mounts
    mounts = config["file_mounts"]
    target = next(remote for remote, local in mounts.items() if local == ".")
    setup = " ".join(config["setup_commands"])
    assert "pip install" in setup and target in setup
    assert f"torch=={_torch_pin()}" in setup
    import ray

    assert f"ray[default,train,tune]=={ray.__version__}" in setup
    for kind in ("head_setup_commands", "worker_setup_commands"):
        assert kind not in config, f"{kind} would replace acol-flow's install on those nodes"
    # The head runs the autoscaler: a custom profile there would replace the one `ray up` creates.
    head = config["available_node_types"][config["head_node_type"]]["node_config"]
    assert "IamInstanceProfile" not in head
    # token auth on every node, with the one token
    assert "~/.ray/auth_token" in mounts
    for kind in ("head_start_ray_commands", "worker_start_ray_commands"):
        start = next(c for c in config[kind] if "ray start" in c)
        assert start.startswith("RAY_AUTH_MODE=token "), start


def _containers(pod_template: dict[str, Any]) -> list[dict[str, Any]]:
    return pod_template["template"]["spec"]["containers"]


def _token_env(container: dict[str, Any]) -> None:
    env = {e["name"]: e for e in container.get("env", [])}
    assert env["RAY_AUTH_MODE"]["value"] == "token", container["name"]
    ref = env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]
    assert ref["name"] and ref["key"], container["name"]
    assert "value" not in env["RAY_AUTH_TOKEN"], "the token must come from a Secret"


def test_rayjob_has_the_fields_kuberay_requires() -> None:
    job = _yaml("rayjob.yaml")
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob" and job["metadata"]["name"]
    spec = job["spec"]
    assert spec["entrypoint"].startswith("acol ")
    cluster = spec["rayClusterSpec"]
    import ray

    assert cluster.get("rayVersion", ray.__version__) == ray.__version__
    head = cluster["headGroupSpec"]
    head_container = _containers(head)[0]
    image = head_container["image"]
    assert image and ":" in image
    ports = {p["containerPort"] for p in head_container["ports"]}
    assert {6379, 8265, 10001} <= ports
    # The submitter reaches the dashboard through the head's service: not on loopback only.
    assert head["rayStartParams"].get("dashboard-host") == "0.0.0.0"
    _token_env(head_container)
    groups = cluster["workerGroupSpecs"]
    assert groups
    for group in groups:
        assert group["groupName"] and isinstance(group["replicas"], int)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
        worker = _containers(group)[0]
        assert worker["image"] == image, "every Ray node runs the one image"
        _token_env(worker)
    submitter = spec.get("submitterPodTemplate")
    if submitter is not None:  # else KubeRay's default submitter (which then lacks the token)
        container = submitter["spec"]["containers"][0]
        assert container["image"] == image and "command" not in container  # KubeRay fills it in
        _token_env(container)
    assert "127.0.0.1" not in (CLUSTER / "rayjob.yaml").read_text()


def test_dockerfile_builds_from_the_ray_image_of_the_installed_ray() -> None:
    ray = pytest.importorskip("ray")
    text = (CLUSTER / "Dockerfile").read_text()
    args = dict(re.findall(r"^ARG (\w+)=(\S*)$", text, flags=re.M))
    assert args["RAY_VERSION"] == ray.__version__
    base = re.search(r"^FROM (\S+)$", text, flags=re.M).group(1)
    assert base.startswith("rayproject/ray:${RAY_VERSION}")
    install = next(line for line in text.splitlines() if "pip install" in line)
    assert f'"torch=={_torch_pin()}"' in install and install.rstrip(" \\").endswith(" .")
    assert '"ray[default,train,tune]==${RAY_VERSION}"' in install
    copied = re.findall(r"^COPY (?:--\S+ )*(\S+) ", text, flags=re.M)
    assert {"pyproject.toml", "acol_core", "flows", "tune"} <= set(copied)


def test_runtime_env_carries_the_code_without_installing_it() -> None:
    env = _yaml("runtime_env.yaml")
    assert "working_dir" not in env, "`ray job submit --working-dir .` gives it"
    assert not env.get("pip") and not env.get("uv") and not env.get("conda")
    assert {".venv", ".git", "runs"} <= set(env["excludes"])
    assert not any(k.startswith("AWS_") for k in env.get("env_vars", {}))
