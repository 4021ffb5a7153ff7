"""nano-vllm-style offline LLM inference engine (also importable as ``nanovllm``)."""
from engine.logger import configure as _configure_logging

_configure_logging()

from engine.llm_engine import LLM, LLMEngine  # noqa: E402
from engine.metrics import StepRecord  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402

__all__ = ["LLM", "LLMEngine", "SamplingParams", "StepRecord"]
