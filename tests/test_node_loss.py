"""Node loss (issue 15): a local multi-node Ray cluster on CPU (``ray.cluster_utils.Cluster``: a head that runs no
actors and two worker nodes of one CPU, so one engine actor each); one worker node is removed while the job
runs. The job finishes with every row exactly once, and stats.json and the final line say what happened."""
import json
import logging

import pyarrow.parquet as pq
import pytest
import ray
from ray.cluster_utils import Cluster

from pipeline.cli import done_line
from pipeline.config import parse_config
from test_pipeline_support import (REPO, TESTS, JobInThread, assert_each_id_once, job_argv, part_files, read_results,
                                   wait_for, write_prompts)

ROWS = 192   # long enough that both actors are still busy when one node goes


@pytest.fixture(scope="module")
def two_node_cluster():
    cluster = Cluster(initialize_head=True, head_node_args=dict(num_cpus=0))
    workers = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, log_to_driver=False,
             job_config=ray.job_config.JobConfig(code_search_path=[str(REPO), str(TESTS)]))
    cluster.wait_for_nodes()
    yield cluster, workers
    ray.shutdown()
    cluster.shutdown()


def test_a_lost_node_costs_its_actor_and_nothing_else(two_node_cluster, tmp_path, caplog):
    cluster, workers = two_node_cluster
    out = tmp_path / "out"
    config = parse_config(job_argv(write_prompts(tmp_path / "in.parquet", [f"node loss {i}" for i in range(ROWS)]),
                                   out, "--job-id", "node-loss", actors=2, shard_size=4, max_tokens=16))
    caplog.set_level(logging.WARNING, logger="pipeline")
    job = JobInThread(config)
    wait_for(lambda: _writers(out) == {"actor-0", "actor-1"}, 240, "shards written by both actors")
    cluster.remove_node(workers[1])  # its actor dies with it; no node is left to place a replacement on
    stats = job.result(timeout=300).stats
    assert stats["status"] == "completed" and stats["rows_done"] == stats["rows_ok"] == ROWS
    assert_each_id_once(read_results(out), ROWS)
    (lost,) = [a for a in stats["actors"].values() if a["status"] == "died"]
    assert lost["error"] and "node" in lost["error"].lower(), lost  # stats.json says why it died
    assert stats["this_run"]["actors_replaced"] >= 1 and stats["this_run"]["shard_retries"] >= 1
    assert any(f"{lost['actor_id']} died while running shard" in r.getMessage() for r in caplog.records)
    assert "actors replaced" in done_line(stats, str(out))
    assert json.loads((out / "stats.json").read_text())["actors"][lost["actor_id"]]["error"] == lost["error"]


def _writers(out) -> set[str]:
    """The actors whose rows are in the part files written so far."""
    return {actor for part in part_files(out)
            for actor in pq.read_table(part, columns=["actor_id"])["actor_id"].to_pylist()}
