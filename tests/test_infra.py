"""Cluster definitions under infra/, checked against the schemas the tools themselves ship."""

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.request
from ipaddress import ip_address
from pathlib import Path

import jsonschema
import pytest
import yaml
from conftest import BIN, free_port
from ports import exposed, listening, marked, process_tree, sockets_of

pytestmark = pytest.mark.ray

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
    # Token authentication, and a dashboard KubeRay's submitter reaches through the Service.
    assert cluster["authOptions"] == {"mode": "token"}
    assert "dashboard-host" not in cluster["headGroupSpec"]["rayStartParams"]
    for group in [cluster["headGroupSpec"], *cluster["workerGroupSpecs"]]:
        containers = group["template"]["spec"]["containers"]
        assert containers and all(c["image"] for c in containers)
    assert "secret" not in (INFRA / "kuberay-rayjob.yaml").read_text().lower()


def test_the_aws_cluster_starts_every_node_with_token_authentication():
    cluster = yaml.safe_load((INFRA / "ray-cluster-aws.yaml").read_text())
    starts = [c for key in ("head_start_ray_commands", "worker_start_ray_commands")
              for c in cluster[key] if "ray start" in c]  # fmt: skip
    assert len(starts) == 2 and all(c.startswith("RAY_AUTH_MODE=token ray start") for c in starts)
    assert cluster["file_mounts"] == {"~/.ray/auth_token": "~/.ray/auth_token"}
    assert "--dashboard-host=127.0.0.1" in starts[0]


def listening_addresses(port: int) -> set:
    """The local addresses with a socket listening on this TCP port (IPv4 and IPv6)."""
    return {address for address, p in listening().values() if p == port}


@pytest.mark.slow
def test_dev_services_start_on_loopback_only_and_stop(tmp_path):
    ports = {"S3_PORT": free_port(), "RAY_PORT": free_port(), "DASHBOARD_PORT": free_port(),
             "RAY_AGENT_PORT": free_port()}  # fmt: skip
    env = {**os.environ, **{k: str(v) for k, v in ports.items()},
           "BIN": str(BIN), "TESSERA_DEV_STATE": str(tmp_path), "RAY_CPUS": "1"}  # fmt: skip
    script = str(INFRA / "dev-services.sh")
    # Someone else's Ray worker, by the name `ray stop` looks for: it must outlive our stop.
    (tmp_path / "default_worker.py").write_text("import time\ntime.sleep(600)\n")
    other = subprocess.Popen([sys.executable, str(tmp_path / "default_worker.py")])
    try:
        started = subprocess.run([script, "start"], env=env, capture_output=True, text=True,
                                 timeout=300)  # fmt: skip
        assert started.returncode == 0, started.stdout + started.stderr
        assert f"export AWS_ENDPOINT_URL=http://127.0.0.1:{ports['S3_PORT']}" in started.stdout
        for port in ports.values():  # the job agent's too, on the port asked for
            bound = listening_addresses(port)
            assert bound and all(a.is_loopback for a in bound), (port, bound)
        # Every port of every process they started (Ray's GCS, raylet, agents, client server,
        # dashboard; moto), IPv4 and IPv6: none reachable from another machine.
        moto = int((tmp_path / "moto.pid").read_text())
        ours = process_tree(marked(f"TESSERA_DEV_SERVICES={tmp_path}") | {moto})
        assert len(sockets_of(ours)) >= 6, sockets_of(ours)
        assert exposed(ours) == []
        # Token authentication is on: no answer without the token, the version with it.
        version = f"http://127.0.0.1:{ports['DASHBOARD_PORT']}/api/version"
        with pytest.raises(urllib.error.HTTPError, match="401"):
            urllib.request.urlopen(version, timeout=5)
        token = (Path.home() / ".ray" / "auth_token").read_text().strip()
        request = urllib.request.Request(version, headers={"Authorization": f"Bearer {token}"})
        assert json.loads(urllib.request.urlopen(request, timeout=5).read())["ray_version"]
    finally:
        stopped = subprocess.run([script, "stop"], env=env, capture_output=True, text=True,
                                 timeout=120)  # fmt: skip
        other_survived = other.poll() is None
        other.kill()
    assert stopped.returncode == 0
    assert not listening_addresses(ports["S3_PORT"])
    assert not listening_addresses(ports["DASHBOARD_PORT"])
    assert not listening_addresses(ports["RAY_PORT"])
    assert not listening_addresses(ports["RAY_AGENT_PORT"])
    assert other_survived, "dev-services.sh stop ended a Ray process it had not started"
    # The head's address is forgotten, as `ray stop` does: a plain ray.init() would wait on it.
    from ray._common.utils import get_ray_address_file

    current = Path(get_ray_address_file(None))
    assert not current.exists() or current.read_text().strip() != f"127.0.0.1:{ports['RAY_PORT']}"


@pytest.mark.slow
def test_a_local_ray_instance_listens_on_loopback_only_and_ignores_a_gone_head(tmp_path):
    """`tessera prepare` and a `tessera run` outside a cluster start Ray for themselves. Ray
    imported first (its cluster flag is read at import) and a `ray start` address left behind
    by a head that is gone: the tasks still run, on a new instance with every port on loopback."""
    import ray
    from ray._common.utils import get_ray_address_file

    from pipeline.orchestrate.ray_tasks import parallel_map

    address_file = Path(get_ray_address_file(None))
    address_file.parent.mkdir(parents=True, exist_ok=True)
    left = address_file.read_text() if address_file.exists() else None
    address_file.write_text(f"127.0.0.1:{free_port()}")  # nothing listens there

    def pid_after(seconds: float, shared: object) -> int:  # local: Ray sends it by value
        time.sleep(seconds)
        return os.getpid()

    seen: list = []
    try:
        out = parallel_map(
            pid_after, [0.5, 0.5], executor="ray",
            on_result=lambda i, r: seen.append(sockets_of(process_tree({os.getpid()}))),
        )  # fmt: skip
    finally:
        if left is None:
            address_file.unlink(missing_ok=True)
        else:
            address_file.write_text(left)
    assert not ray.is_initialized()
    assert len(out) == 2 and os.getpid() not in out  # ran in Ray's workers
    assert all(len(sockets) >= 4 for sockets in seen), seen  # the GCS, raylet, agents, workers
    assert [s for sockets in seen for s in sockets if not ip_address(s[2]).is_loopback] == []


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (INFRA / "Dockerfile").read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [tuple(line.split(None, 1)) for line in lines if line and not line.startswith("#")]


def test_dockerfile_pins_every_version_and_copies_what_exists():
    steps = dockerfile_instructions()
    base = next(arg for op, arg in steps if op == "FROM")
    assert ":" in base and not base.endswith(":latest"), base
    args = {a.split("=")[0]: a.split("=")[1] for op, a in steps if op == "ARG" and "=" in a}
    makefile = (INFRA.parent / "Makefile").read_text()
    assert f"TORCH_CPU ?= torch=={args['TORCH']}" in makefile  # one torch version, CPU or CUDA
    installs = [cmd for op, arg in steps if op == "RUN" for cmd in arg.split("&&")
                if "pip install" in cmd]  # fmt: skip
    assert installs
    for cmd in installs:
        words = cmd.split()[cmd.split().index("install") + 1 :]
        packages = [w for w in words if not w.startswith("-") and w not in ("constraints.txt",)]
        for package in packages:  # `.` is this project: its dependencies come from constraints
            assert package == "." or "==" in package, f"unpinned: {cmd}"
        if "." in packages:
            assert "-c constraints.txt" in cmd
    for op, arg in steps:
        if op == "COPY":
            for source in arg.split()[:-1]:
                assert (INFRA.parent / source).exists(), source
    # The image the cluster definitions run is the one this file builds.
    tag = re.search(
        r"docker build -f infra/Dockerfile -t (\S+)", (INFRA / "Dockerfile").read_text()
    )
    for definition in ("ray-cluster-aws.yaml", "kuberay-rayjob.yaml"):
        assert f"image: {tag.group(1)}" in (INFRA / definition).read_text()
