"""A small built-in prompt set, so a first run needs no data: ``--input sample`` (or no --input)."""
import itertools

import pyarrow as pa

TASKS = (
    "Write a haiku about {}.",
    "Explain {} to a ten-year-old in two sentences.",
    "List three surprising facts about {}.",
    "Write the opening line of a mystery novel set near {}.",
    "Give a one-paragraph summary of how {} works.",
    "Suggest a name for a startup that builds {}.",
    "Describe {} using only questions.",
    "What would a pirate say about {}?",
)
TOPICS = ("the ocean", "a mountain city", "rainy mornings", "distributed databases", "the moon",
          "a paged KV cache", "old libraries", "GPU kernels")


def sample_prompts(num_rows: int = 64) -> pa.Table:
    """``num_rows`` prompts (``id``, ``prompt``), deterministic; every 8th row caps ``max_tokens`` at 16
    to show per-row overrides (null elsewhere: the --max-tokens flag applies)."""
    prompts = [task.format(topic) for topic, task in itertools.islice(itertools.product(TOPICS, TASKS), num_rows)]
    return pa.table({
        "id": pa.array(range(len(prompts)), pa.int64()),
        "prompt": pa.array(prompts, pa.string()),
        "max_tokens": pa.array([16 if i % 8 == 7 else None for i in range(len(prompts))], pa.int64()),
    })
