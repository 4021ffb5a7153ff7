"""The cluster (issue 6, issue 15): cluster.yaml is a valid Ray cluster-launcher config for a GPU cluster; a job
submitted with ``ray job submit --working-dir .`` runs on a cluster (here a local one started by the test),
writes every row, its stats and steps to --output, shows its logs in ``ray job logs``, and ends cleanly when
``ray job stop`` stops it; and the documented ``ray start`` + ``ray job submit`` commands work as written,
with Ray's token authentication."""
import copy
import json
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from test_pipeline_support import (REPO, assert_each_id_once, free_port, job_argv, part_files, read_results,
                                   start_ray_cluster, subprocess_env, wait_for, write_prompts)

CLUSTER_YAML = REPO / "cluster.yaml"
JOB_ROWS = 12
ray_cluster = pytest.fixture(scope="module")(start_ray_cluster)


# ----- cluster.yaml ------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_schema() -> dict:
    """The JSON schema the cluster launcher validates configs with, shipped inside the ray package."""
    import ray.autoscaler
    return json.loads((Path(ray.autoscaler.__file__).parent / "ray-schema.json").read_text())


def test_cluster_yaml_validates_against_rays_schema(cluster_config):
    import jsonschema
    jsonschema.validate(cluster_config, ray_schema())


def test_cluster_yaml_passes_ray_ups_own_checks(cluster_config):
    """What ``ray up`` does before it contacts the cloud: merge the provider's defaults, then validate_config
    (the schema again on the merged config, plus head-node-type and worker-count checks)."""
    from ray.autoscaler._private.util import prepare_config, validate_config
    validate_config(prepare_config(copy.deepcopy(cluster_config)))


def test_schema_check_catches_a_broken_config(cluster_config):
    import jsonschema
    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu_worker"]["resources"]["GPU"] = "one"
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())
    broken = copy.deepcopy(cluster_config)
    broken["available_node_types"]["gpu_worker"]["node_typo"] = {}
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(broken, ray_schema())


def test_cluster_yaml_describes_an_autoscaling_gpu_cluster_that_installs_the_project(cluster_config):
    types = cluster_config["available_node_types"]
    head = types[cluster_config["head_node_type"]]
    workers = [t for name, t in types.items() if name != cluster_config["head_node_type"]]
    assert head["resources"].get("GPU", 0) == 0
    gpu_workers = [t for t in workers if t["resources"].get("GPU", 0) >= 1]
    assert gpu_workers and all(t["max_workers"] > t.get("min_workers", 0) for t in gpu_workers)
    assert cluster_config["max_workers"] >= max(t["max_workers"] for t in gpu_workers)
    image = cluster_config["docker"]["image"]
    assert image.startswith("rayproject/ray:") and image.endswith("-gpu")
    (remote,) = [r for r, local in cluster_config["file_mounts"].items() if local == "."]
    assert any("pip install" in cmd and remote.lstrip("~/") in cmd for cmd in cluster_config["setup_commands"])


# ----- job submission ----------------------------------------------------------------------------------------------
def ray_cli(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    """The ``ray`` command of this interpreter's environment, run from the repository root."""
    ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
    return subprocess.run([ray_bin, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def submitted_job(ray_cluster, tmp_path_factory):
    """``ray job submit --working-dir . -- python jobs/offline_batch.py ...`` against the test's cluster, with the
    cluster's address in RAY_ADDRESS (no --address), waiting for the job like a user would."""
    root = tmp_path_factory.mktemp("submitted")
    write_prompts(root / "input.parquet", [f"Row {i}: tell me about the harbour" for i in range(JOB_ROWS)])
    output = root / "out"
    submission_id = f"nanovllm-test-{uuid.uuid4().hex[:8]}"
    env = {**subprocess_env(), "RAY_ADDRESS": ray_cluster.address}
    argv = job_argv(root / "input.parquet", output, "--job-id", "submitted", actors=1, shard_size=5)
    submit = wait_for(lambda: _submit(env, submission_id, argv), timeout=300,
                      what="the cluster's job agent to accept the submission", interval=1.0)
    logs = ray_cli("job", "logs", "--address", ray_cluster.address, submission_id, env=subprocess_env(), timeout=60)
    return dict(submit=submit, logs=logs, output=output, submission_id=submission_id, address=ray_cluster.address)


def _submit(env: dict[str, str], submission_id: str, argv: list[str]) -> subprocess.CompletedProcess | None:
    """Submit and wait for the job; None while the freshly started cluster's job agent is not up yet."""
    submit = ray_cli("job", "submit", "--submission-id", submission_id, "--working-dir", ".", "--",
                     "python", "jobs/offline_batch.py", *argv, env=env, timeout=300)
    return None if "No available agent to submit job" in submit.stderr else submit


def test_submitted_job_succeeds(submitted_job):
    submit = submitted_job["submit"]
    assert submit.returncode == 0, submit.stdout[-3000:] + submit.stderr[-3000:]
    assert "succeeded" in submit.stdout.lower()
    from ray.job_submission import JobStatus, JobSubmissionClient
    client = JobSubmissionClient(submitted_job["address"])
    assert client.get_job_status(submitted_job["submission_id"]) == JobStatus.SUCCEEDED


def test_submitted_job_writes_every_row_and_its_stats_to_the_output(submitted_job):
    output = submitted_job["output"]
    results = read_results(output)
    assert_each_id_once(results, JOB_ROWS)
    assert results.column("finish_reason").to_pylist() == ["length"] * JOB_ROWS
    assert all(n == 4 for n in results.column("num_generated_tokens").to_pylist())
    stats = json.loads((output / "stats.json").read_text())
    assert (stats["status"], stats["rows_total"], stats["rows_done"], stats["rows_failed"]) == \
        ("completed", JOB_ROWS, JOB_ROWS, 0)
    assert stats["job_id"] == "submitted" and stats["generated_tokens"] == 4 * JOB_ROWS
    steps = pq.read_table(output / "steps.parquet")
    assert steps.num_rows > 0 and set(steps.column("actor_id").to_pylist()) == {"actor-0"}


def test_submitted_jobs_logs_show_in_ray_job_logs(submitted_job):
    logs = submitted_job["logs"]
    assert logs.returncode == 0, logs.stderr[-3000:]
    assert f"done: {JOB_ROWS} rows (0 failed)" in logs.stdout
    assert "[progress]" in logs.stdout and str(submitted_job["output"]) in logs.stdout
    # The driver joined the cluster the job was submitted to (RAY_ADDRESS, set by Ray for the job) instead of
    # starting one of its own.
    assert f"Connecting to existing Ray cluster at address: {submitted_job['address']}" in logs.stdout


def test_ray_job_stop_interrupts_the_job_cleanly(submitted_job, tmp_path):
    """``ray job stop`` sends SIGTERM (SIGKILL 3 s later): the driver ends as interrupted, with its steps merged,
    no _tmp/ left, and the command that resumes in the job's logs."""
    output, submission_id = tmp_path / "out", f"nanovllm-stop-{uuid.uuid4().hex[:8]}"
    env = {**subprocess_env(), "RAY_ADDRESS": submitted_job["address"]}
    # Far more work than a stop can race: the driver finishes the rows in flight after SIGTERM, so a small input
    # could end complete before the stop arrives.
    rows = 400
    prompts = write_prompts(tmp_path / "in.parquet", [f"Stop row {i}: describe the river" for i in range(rows)])
    argv = job_argv(prompts, output, shard_size=4, max_tokens=32)
    submit = ray_cli("job", "submit", "--no-wait", "--submission-id", submission_id, "--working-dir", ".", "--",
                     "python", "jobs/offline_batch.py", *argv, env=env, timeout=120)
    assert submit.returncode == 0, submit.stderr[-3000:]
    wait_for(lambda: part_files(output), 240, "the first part file")
    stop = ray_cli("job", "stop", submission_id, env=env, timeout=120)
    assert stop.returncode == 0, stop.stderr[-3000:]
    stats = json.loads((output / "stats.json").read_text())
    assert stats["status"] == "interrupted" and 0 < stats["rows_done"] < rows
    assert (output / "steps.parquet").exists() and not (output / "_tmp").exists()
    logs = wait_for(lambda: (r := ray_cli("job", "logs", submission_id, env=env, timeout=60)) and
                    "resume with: python jobs/offline_batch.py" in r.stdout and r, 30, "the resume hint in the logs")
    assert "Traceback" not in logs.stdout and "SystemError" not in logs.stdout


# ----- the documented local cluster ---------------------------------------------------------------------------------
# docs/cluster.md, "A cluster on one machine": each line as written there.
DOC_EXPORT = "export RAY_AUTH_MODE=token"
DOC_START = "ray start --head --node-ip-address 127.0.0.1"
DOC_SUBMIT = ("ray job submit --address http://127.0.0.1:8265 --working-dir . -- python jobs/offline_batch.py "
              "--output /tmp/job1")
DOC_TOKEN = "ray get-auth-token"


def test_the_documented_local_cluster_commands_work(tmp_path):
    """The commands run as docs/cluster.md writes them, RAY_AUTH_MODE coming only from its ``export`` line; the test
    adds free ports and a temporary dir to ``ray start`` (so as not to meet other Ray instances of this machine),
    ``--block`` (so that it stops this cluster alone, where the docs' ``ray stop`` would stop every one), and a
    small job (the demo-random model, few tokens) with its own --output."""
    doc = (REPO / "docs" / "cluster.md").read_text()
    assert all(line in doc for line in (DOC_EXPORT, DOC_START, DOC_SUBMIT, DOC_TOKEN, "ray stop"))
    assert "RAY_AUTH_MODE=token" in (REPO / "README.md").read_text()
    env = {k: v for k, v in subprocess_env().items() if not k.startswith(("RAY_AUTH", "RAY_ADDRESS"))}
    env.update(dict([DOC_EXPORT.removeprefix("export ").split("=")]))
    dashboard_port = free_port()
    # Every port that has a fixed default gets a free one: the module's own cluster (and others) hold the defaults.
    ports = [f"--{name}={free_port()}" for name in ("port", "ray-client-server-port", "dashboard-agent-listen-port",
                                                    "metrics-export-port")]
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # short: Ray's socket paths must stay short
    head_log = open(tmp_path / "ray-start.log", "w")
    head = subprocess.Popen([*shlex.split(DOC_START), *ports, f"--dashboard-port={dashboard_port}",
                             f"--temp-dir={temp_dir}", "--num-cpus=2", "--disable-usage-stats", "--block"],
                            cwd=REPO, env=env, stdout=head_log, stderr=subprocess.STDOUT)
    try:
        address = f"http://127.0.0.1:{dashboard_port}"
        submit_argv = shlex.split(DOC_SUBMIT.replace("http://127.0.0.1:8265", address).replace(
            "/tmp/job1", str(tmp_path / "job1")))
        submit_argv += ["--model", "demo-random", "--device", "cpu", "--max-tokens", "4", "--shard-size", "32"]
        submit = wait_for(lambda: _submit_when_up(submit_argv, env), 180, "the job API of the new cluster", interval=2)
        assert submit.returncode == 0 and "succeeded" in submit.stdout.lower(), submit.stdout[-2000:] + submit.stderr
        assert_each_id_once(read_results(tmp_path / "job1"), 64)
        token = ray_cli(*shlex.split(DOC_TOKEN)[1:], env=env, timeout=60).stdout.strip().splitlines()[-1]
        assert _api_status(address, None) == 401 and _api_status(address, token) == 200
    finally:
        head.terminate()  # ray start --block stops the processes of its cluster on SIGTERM
        head.wait(timeout=120)
        head_log.close()
        shutil.rmtree(temp_dir, ignore_errors=True)


def _submit_when_up(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess | None:
    """``ray job submit`` once the cluster's job API answers; None while it does not yet."""
    result = ray_cli(*argv[1:], env=env, timeout=300)
    not_up = ("Failed to connect", "No available agent", "Connection refused", "ConnectionError")
    return None if result.returncode and any(s in result.stderr for s in not_up) else result


def _api_status(address: str, token: str | None) -> int:
    request = urllib.request.Request(f"{address}/api/version",
                                     headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        return urllib.request.urlopen(request, timeout=10).status
    except urllib.error.HTTPError as e:
        return e.code
