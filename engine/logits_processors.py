"""Per-request logits processors with vLLM's meanings, applied on the device before sampling, only to the rows
that ask for them:

- ``logit_bias``: ``{token_id: bias}`` added to the logits;
- ``min_tokens``: EOS and ``stop_token_ids`` are masked out until that many tokens are generated;
- ``repetition_penalty`` (over prompt and output tokens): a seen token's logit is divided by it when positive,
  multiplied by it otherwise (HF's ``RepetitionPenaltyLogitsProcessor``);
- ``presence_penalty`` / ``frequency_penalty`` (over output tokens): ``logit -= presence * (count > 0) +
  frequency * count``.

They are applied in that order (vLLM's: bias and min_tokens, then the penalties), before the grammar mask,
temperature, top-k, top-p and min-p. The token penalties need every token generated so far on the host: under
async scheduling the engine queues the sampling of a step with such rows only after postprocessing the step
before it (deferred sampling, engine/llm_engine.py). ``min_tokens`` needs only their count, ``logit_bias``
nothing.
"""
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from engine.sampling_params import SamplingParams


@dataclass
class ProcessorRow:
    """One logits row that needs processing: its request's settings, its tokens (complete when a token penalty
    is on) and how many tokens it has generated (counting any still in flight)."""
    row: int
    params: SamplingParams
    prompt_ids: Sequence[int]
    output_ids: Sequence[int]
    num_generated: int


@dataclass
class PenaltyBatch:
    """Device tensors for the rows that need processing (``rows``); a ``None`` part is off for every row."""
    rows: torch.Tensor                                            # [R] logits rows
    bias: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # (row in R, token id, bias), flat
    banned: tuple[torch.Tensor, torch.Tensor] | None              # (row in R, token id): min_tokens not reached
    penalties: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None  # [R] repetition, presence, frequency
    prompt_ids: torch.Tensor | None                               # [R, Lp] padded with vocab_size
    output_ids: torch.Tensor | None                               # [R, Lo] padded with vocab_size


def needs_processing(params: SamplingParams) -> bool:
    return params.has_penalties or params.min_tokens > 0 or bool(params.logit_bias)


def build_penalty_batch(rows: list[ProcessorRow], stop_ids: Iterable[int], vocab_size: int,
                        device: torch.device | str) -> PenaltyBatch:
    """``stop_ids``: the EOS ids that ``min_tokens`` holds back (besides each request's stop_token_ids)."""
    stop_ids = list(stop_ids)
    device = torch.device(device)
    upload = lambda a, dtype: _upload(torch.as_tensor(np.asarray(a), dtype=dtype), device)
    bias = [(i, t, b) for i, r in enumerate(rows) for t, b in r.params.logit_bias.items() if t < vocab_size]
    banned = [(i, t) for i, r in enumerate(rows) if r.num_generated < r.params.min_tokens
              for t in (r.params.stop_token_ids if r.params.ignore_eos else stop_ids + r.params.stop_token_ids)
              if t < vocab_size]
    penalized = any(r.params.has_penalties for r in rows)
    factors = [[r.params.repetition_penalty, r.params.presence_penalty, r.params.frequency_penalty] for r in rows]
    return PenaltyBatch(
        rows=upload([r.row for r in rows], torch.int64),
        bias=_columns(bias, (torch.int64, torch.int64, torch.float32), upload),
        banned=_columns(banned, (torch.int64, torch.int64), upload),
        penalties=tuple(upload(np.array(factors, dtype=np.float32).T, torch.float32)) if penalized else None,
        prompt_ids=upload(_pad([r.prompt_ids for r in rows], vocab_size), torch.int64) if penalized else None,
        output_ids=upload(_pad([r.output_ids for r in rows], vocab_size), torch.int64) if penalized else None)


def _upload(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Copy to the device without waiting: from pinned memory on CUDA (a pageable copy may wait for the stream,
    i.e. for the forward pass that a deferred sampling is queued behind)."""
    if device.type == "cuda":
        tensor = tensor.pin_memory()
    return tensor.to(device, non_blocking=True)


def _columns(items: list[tuple], dtypes: tuple[torch.dtype, ...], upload) -> tuple[torch.Tensor, ...] | None:
    if not items:
        return None
    return tuple(upload(column, dtype) for column, dtype in zip(zip(*items), dtypes))


def _pad(token_lists: list[Sequence[int]], pad: int) -> np.ndarray:
    width = max(1, max(len(t) for t in token_lists))
    out = np.full((len(token_lists), width), pad, dtype=np.int64)
    for i, tokens in enumerate(token_lists):
        out[i, :len(tokens)] = tokens
    return out


def apply_penalties(logits: torch.Tensor, batch: PenaltyBatch) -> torch.Tensor:
    """``logits`` ``[B, V]`` with the processors applied to ``batch.rows`` (float32; a new tensor)."""
    logits = logits.float().clone()
    sub = logits.index_select(0, batch.rows)
    if batch.bias is not None:
        row, token, bias = batch.bias
        sub.index_put_((row, token), bias, accumulate=True)
    if batch.banned is not None:
        sub[batch.banned] = float("-inf")
    if batch.penalties is not None:
        sub = _apply_token_penalties(sub, batch)
    return logits.index_copy_(0, batch.rows, sub)


def _apply_token_penalties(logits: torch.Tensor, batch: PenaltyBatch) -> torch.Tensor:
    repetition, presence, frequency = (p.unsqueeze(1) for p in batch.penalties)
    rows, vocab = logits.shape
    counts = torch.zeros(rows, vocab + 1, device=logits.device)  # the extra column takes the padding
    counts.scatter_add_(1, batch.output_ids, torch.ones_like(batch.output_ids, dtype=counts.dtype))
    in_prompt = torch.zeros(rows, vocab + 1, dtype=torch.bool, device=logits.device)
    in_prompt.scatter_(1, batch.prompt_ids, True)
    counts, seen = counts[:, :vocab], (in_prompt[:, :vocab] | (counts[:, :vocab] > 0))
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    return logits - frequency * counts - presence * (counts > 0).float()
