"""Ray batch inference over Arrow datasets with the nano-vllm engine (docs/pipeline.md, docs/reliability.md).

Data flows one way: the driver (:mod:`pipeline.driver`, :mod:`pipeline.dispatch`) reads the input
(:mod:`pipeline.inputs`) as shards and hands each to an idle engine actor (:mod:`pipeline.actor`), which
turns rows into requests and results (:mod:`pipeline.rows`); the driver writes each finished shard
atomically (:mod:`pipeline.output`) and aggregates timings (:mod:`pipeline.stats`).
"""
from pipeline.config import JobConfig, parse_config
from pipeline.errors import JobFailed, PipelineError, UsageError

__all__ = ["JobConfig", "parse_config", "PipelineError", "UsageError", "JobFailed"]
