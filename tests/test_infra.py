"""Cluster definitions under infra/, checked against the schemas the tools themselves ship."""

import json
from pathlib import Path

import jsonschema
import pytest
import yaml

INFRA = Path(__file__).parent.parent / "infra"


def ray_schema() -> dict:
    import ray.autoscaler

    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


@pytest.mark.parametrize("path", sorted(INFRA.glob("ray-cluster-*.yaml")), ids=lambda p: p.name)
def test_ray_cluster_definitions_validate_against_rays_schema(path):
    cluster = yaml.safe_load(path.read_text())
    jsonschema.validate(cluster, ray_schema())
    assert cluster["head_node_type"] in cluster["available_node_types"]
    # The dashboard and job API stay on loopback; nothing in the file carries a credential.
    head_start = " ".join(cluster["head_start_ray_commands"])
    assert "--dashboard-host=127.0.0.1" in head_start
    text = path.read_text().lower()
    assert "aws_secret_access_key" not in text and "aws_access_key_id" not in text


def test_the_schema_check_catches_a_mistake():
    cluster = yaml.safe_load((INFRA / "ray-cluster-aws.yaml").read_text())
    cluster["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "eight"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(cluster, ray_schema())


def test_hostfile_lines_name_a_host_and_its_slots():
    lines = [ln for ln in (INFRA / "hostfile").read_text().splitlines() if not ln.startswith("#")]
    for line in filter(None, lines):
        host, slots = line.split()
        assert host and slots.startswith("slots=") and int(slots.split("=")[1]) > 0


def test_kuberay_rayjob_names_what_kuberay_needs():
    # KubeRay ships no schema that works offline; check the fields its v1 CRD requires.
    job = yaml.safe_load((INFRA / "kuberay-rayjob.yaml").read_text())
    assert job["apiVersion"] == "ray.io/v1" and job["kind"] == "RayJob"
    spec = job["spec"]
    assert spec["entrypoint"].startswith("tessera run configs/")
    assert (Path(__file__).parent.parent / spec["entrypoint"].split()[-1]).exists()
    cluster = spec["rayClusterSpec"]
    assert cluster["headGroupSpec"]["rayStartParams"]["dashboard-host"] == "127.0.0.1"
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["image"] for c in containers)
    assert "secret" not in (INFRA / "kuberay-rayjob.yaml").read_text().lower()
