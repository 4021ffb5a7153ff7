"""Alias package: ``from nanovllm import LLM, SamplingParams`` is ``from engine import ...``."""
from engine import LLM, LLMEngine, SamplingParams, StepRecord

__all__ = ["LLM", "LLMEngine", "SamplingParams", "StepRecord"]
