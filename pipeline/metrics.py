"""Engine and row metrics published from each actor with ``ray.util.metrics``.

Ray exports them on every node's Prometheus endpoint (and so to the dashboard's Grafana panels) with a
``ray_`` prefix; counters also get ``_total``. Every series is tagged with ``job_id`` and ``actor_id``.
"""
from typing import Any

from ray.util.metrics import Counter, Gauge, Histogram

TAG_KEYS = ("job_id", "actor_id")
STEP_TIME_BOUNDARIES = [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0]


class ActorMetrics:
    def __init__(self, job_id: str, actor_id: str):
        tags = {"job_id": job_id, "actor_id": actor_id}

        def make(cls, name: str, description: str, **kwargs):
            metric = cls(name, description=description, tag_keys=TAG_KEYS, **kwargs)
            metric.set_default_tags(tags)
            return metric

        self.running = make(Gauge, "nanovllm_running_seqs", "Sequences running in the engine after the step")
        self.waiting = make(Gauge, "nanovllm_waiting_seqs", "Sequences waiting in the engine after the step")
        self.kv_usage = make(Gauge, "nanovllm_kv_cache_usage", "Fraction of KV-cache blocks in use")
        self.prefix_hit_rate = make(Gauge, "nanovllm_prefix_cache_hit_rate",
                                    "Prompt tokens served from the prefix cache / prompt tokens prefilled")
        self.tokens = make(Counter, "nanovllm_generated_tokens", "Tokens of the rows returned (as in stats.json)")
        self.step_time = make(Histogram, "nanovllm_step_time_s", "Engine step time (seconds)",
                              boundaries=STEP_TIME_BOUNDARIES)
        self.rows_done = make(Counter, "pipeline_rows_done", "Rows finished (with a result or an error)")
        self.rows_failed = make(Counter, "pipeline_rows_failed", "Rows finished with an error")
        self._prefill_tokens = self._hit_tokens = 0

    def on_step(self, record: dict[str, Any]) -> None:
        """Update from one engine StepRecord (as a dict)."""
        self.running.set(record["num_running"])
        self.waiting.set(record["num_waiting"])
        blocks = record["kv_blocks_used"] + record["kv_blocks_free"]
        self.kv_usage.set(record["kv_blocks_used"] / blocks if blocks else 0.0)
        if record["phase"] == "prefill":
            self._hit_tokens += record["prefix_cache_hit_tokens"]
            self._prefill_tokens += record["num_prefill_tokens"] + record["prefix_cache_hit_tokens"]
            self.prefix_hit_rate.set(self._hit_tokens / self._prefill_tokens if self._prefill_tokens else 0.0)
        self.step_time.observe(record["step_time_s"])

    def on_shard(self, rows_ok: int, rows_failed: int, generated_tokens: int) -> None:
        """Count a returned shard's rows and tokens. Tokens are counted here, from the rows' results, not per
        step: a step also samples the token of a sequence that already stopped (async scheduling drops it),
        and the steps of an attempt that fails are redone elsewhere; neither is in the results."""
        if generated_tokens:
            self.tokens.inc(generated_tokens)
        if rows_ok + rows_failed:
            self.rows_done.inc(rows_ok + rows_failed)
        if rows_failed:
            self.rows_failed.inc(rows_failed)
