"""Batched sampling: greedy, temperature, top-k, top-p, min-p, with per-request seeds.

Sampling uses the Gumbel-max form of the exponential race: ``argmax(logits / T - log(E))`` with
``E = -log(U) ~ Exp(1)`` draws from ``softmax(logits / T)`` exactly, with no softmax or sort on the common
path (masks for top-k / top-p / min-p set excluded logits to -inf first). Rows with a seed get their noise from a counter-based hash of (seed, output position, token id),
so a seeded request samples the same tokens whatever else is in the batch.

On CUDA the noise, scaling and argmax are Triton kernels (``triton_fused.gumbel_argmax``: each row's vocabulary
raced in slices by several programs when the batch is small, then a winner per row) that make the noise in
registers: the hash above, bit for bit, for seeded rows; Philox keyed by (row, step seed) for the
others. The step seed is a host-side counter, so consecutive steps differ without a device sync.

:meth:`Sampler.sample` first reads the raw logits of the rows that ask for logprobs, then applies the logits
processors (``engine.logits_processors``) and the grammar bitmask of the rows that have them, samples, and
finishes the logprobs with the sampled tokens; each part costs nothing when no row of the batch uses it (host
flags, no kernels). The processors' tensors and the bitmask come with the :class:`SamplingBatch`, built when
the runner queues the sampling: for a step whose rows need the previous step's tokens on the host, after its
forward pass (deferred sampling, engine/llm_engine.py); the logits are still the raw ones then.

On CUDA the logprobs never materialise a log-softmax: ``triton_logprobs`` takes each row's logsumexp and top-k
logits in one read and gathers the sampled token's logit afterwards (:func:`raw_logprobs`); elsewhere
``torch.log_softmax`` + ``topk`` is the exact reference.
"""
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from engine.layers.fusion import use_triton_kernels
from engine.logits_processors import PenaltyBatch, apply_penalties

_MASK31 = (1 << 31) - 1
_MIX1 = 0xFF51AFD7ED558CCD - (1 << 64)  # splitmix/murmur finaliser constants as signed int64
_MIX2 = 0xC4CEB9FE1A85EC53 - (1 << 64)
_BELOW_ONE = 1 - 2 ** -24  # largest float32 below 1
_STEP_SEEDS = 1 << 31


def hashed_uniform(seeds: torch.Tensor, positions: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """Uniform (0, 1) noise ``[rows, vocab]`` that depends only on each row's (seed, position)."""
    ids = torch.arange(vocab_size, device=seeds.device, dtype=torch.int64)
    x = seeds[:, None] * 0x9E3779B1 + positions[:, None] * 0x85EBCA77 + ids[None, :] * 0x27D4EB2F
    for mult in (_MIX1, _MIX2):
        x = x ^ ((x >> 33) & _MASK31)
        x = x * mult
    x = x ^ ((x >> 33) & _MASK31)
    # k + 0.5 rounds up to 2**24 for k = 2**24 - 1: cap below 1, else -log(-log(u)) = +inf wins even at -inf logits
    return ((((x >> 40) & 0xFFFFFF).float() + 0.5) / float(1 << 24)).clamp_(max=_BELOW_ONE)


@dataclass
class SamplingBatch:
    """Per-row settings as device tensors ``[B]`` plus host flags that skip unused work without a sync."""
    temperatures: torch.Tensor
    top_ks: torch.Tensor        # <= 0: off
    top_ps: torch.Tensor
    min_ps: torch.Tensor
    seeds: torch.Tensor         # < 0: no seed
    positions: torch.Tensor     # output position of the token being sampled
    all_greedy: bool
    any_greedy: bool
    use_top_k_top_p: bool
    use_min_p: bool
    any_seeded: bool
    logprob_rows: torch.Tensor | None = None  # [R] rows whose sampled token's logprobs are returned
    logprob_row_list: list[int] = field(default_factory=list)  # the same rows, on the host
    num_logprobs: int = 0                     # top-k alternatives for them (the most any of them asks)
    penalties: PenaltyBatch | None = None
    bitmask: torch.Tensor | None = None  # [B, ceil(V / 32)] allowed tokens (xgrammar's layout; all, for free rows)


@dataclass
class TokenLogprobs:
    """Per row: the logprob of its token, and the ``k`` most likely tokens with their logprobs."""
    token: torch.Tensor    # [R]
    top_ids: torch.Tensor  # [R, k]
    top: torch.Tensor      # [R, k]

    def numpy(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(token, top_ids, top)`` as numpy views of these host tensors."""
        return self.token.numpy(), self.top_ids.numpy(), self.top.numpy()


def token_logprobs(logprobs: torch.Tensor, token_ids: torch.Tensor, k: int) -> TokenLogprobs:
    """From log-softmaxed rows ``[R, V]``: each row's logprob of ``token_ids[r]`` and its top ``k``."""
    top, top_ids = logprobs.topk(k, dim=-1) if k else (logprobs[:, :0], logprobs[:, :0].long())
    return TokenLogprobs(logprobs.gather(1, token_ids.unsqueeze(1)).squeeze(1), top_ids, top)


def raw_logprobs(logits: torch.Tensor, rows: torch.Tensor, k: int) -> Callable[[torch.Tensor], TokenLogprobs]:
    """Start the raw logprobs of ``rows`` ``[R]`` of ``logits`` ``[B, V]`` with their top ``k``; the returned
    function, given a token id per logits row ``[B]`` (the sampled ones), finishes them.

    This reads ``logits`` now, so call it before the logits are processed. On CUDA the finish reads the tokens'
    own logits again: their rows must not change in between (penalties make a new tensor).
    """
    if use_triton_kernels(logits):
        from engine.kernels.triton_logprobs import finish_logprobs, logprob_partials
        partials = logprob_partials(logits, rows, k)
        return lambda token_ids: TokenLogprobs(*finish_logprobs(partials, logits, rows, token_ids))
    logprobs = torch.log_softmax(logits.index_select(0, rows).float(), dim=-1)
    return lambda token_ids: token_logprobs(logprobs, token_ids.index_select(0, rows), k)


class Sampler(nn.Module):
    def __init__(self, seed: int = 0):
        super().__init__()
        self.seed = seed
        self.generator: torch.Generator | None = None
        self.step_seed = (seed * 0x9E3779B1) % _STEP_SEEDS  # spreads engine seeds over the counter's cycle

    def sample(self, logits: torch.Tensor, batch: SamplingBatch) -> tuple[torch.Tensor, TokenLogprobs | None]:
        """Sampled token ids ``[B]`` after the grammar mask and logits processors, and the raw logprobs of the
        ``batch.logprob_rows`` (None when no row asks)."""
        finish_logprobs = None
        if batch.logprob_rows is not None:
            finish_logprobs = raw_logprobs(logits, batch.logprob_rows, batch.num_logprobs)
        raw = logits
        if batch.penalties is not None:
            logits = apply_penalties(logits, batch.penalties)
        bitmask = batch.bitmask
        if bitmask is not None and not self._masks_in_kernel(logits, batch):
            from engine.structured import apply_bitmask
            if finish_logprobs is not None and logits is raw and raw.dtype == torch.float32:
                logits = logits.clone()  # apply_bitmask masks fp32 logits in place; the logprobs read the raw ones
            logits, bitmask = apply_bitmask(logits, bitmask), None
        sampled = self(logits, batch, bitmask)
        return sampled, finish_logprobs and finish_logprobs(sampled)

    @staticmethod
    def _masks_in_kernel(logits: torch.Tensor, batch: SamplingBatch) -> bool:
        """Whether the Gumbel-max kernel applies the grammar bitmask itself: it then reads the logits as they are
        (no fp32 copy, no masking pass). Top-k/top-p/min-p need the mask first: the kept tokens depend on it."""
        return use_triton_kernels(logits) and not (batch.use_top_k_top_p or batch.use_min_p)

    def forward(self, logits: torch.Tensor, batch: SamplingBatch, bitmask: torch.Tensor | None = None) -> torch.Tensor:
        """logits ``[B, V]`` → sampled token ids ``[B]``; ``bitmask`` (the kernel path only, see
        :meth:`_masks_in_kernel`): the grammar's allowed tokens."""
        if batch.all_greedy and bitmask is None:
            return logits.argmax(dim=-1)
        temperatures = batch.temperatures
        if batch.use_top_k_top_p or batch.use_min_p:
            logits = logits.float() / torch.where(temperatures > 0, temperatures, 1.0).unsqueeze(1)
            temperatures = (temperatures > 0).to(temperatures.dtype)  # already applied; 0 still marks greedy
            if batch.use_top_k_top_p:
                logits = _top_k_top_p(logits, batch.top_ks, batch.top_ps)
            if batch.use_min_p:
                probs = torch.softmax(logits, dim=-1)
                threshold = batch.min_ps.unsqueeze(1) * probs.amax(dim=-1, keepdim=True)
                logits = logits.masked_fill(probs < threshold, float("-inf"))
        if use_triton_kernels(logits):
            from engine.kernels.triton_fused import gumbel_argmax
            self.step_seed = (self.step_seed + 1) % _STEP_SEEDS
            return gumbel_argmax(logits, temperatures, batch.seeds, batch.positions, self.step_seed, bitmask=bitmask)
        sampled = _gumbel_argmax(logits, temperatures, self._uniform(logits, batch))
        if batch.any_greedy:
            sampled = torch.where(batch.temperatures > 0, sampled, logits.argmax(dim=-1))
        return sampled

    def _uniform(self, logits: torch.Tensor, batch: SamplingBatch) -> torch.Tensor:
        if self.generator is None or self.generator.device != logits.device:
            self.generator = torch.Generator(logits.device).manual_seed(self.seed)
        noise = torch.rand(logits.shape, generator=self.generator, device=logits.device,
                           dtype=torch.float32).clamp_(min=1e-10)
        if batch.any_seeded:
            seeded = (batch.seeds >= 0).nonzero().squeeze(1)
            noise[seeded] = hashed_uniform(batch.seeds[seeded], batch.positions[seeded], logits.shape[1])
        return noise


def _gumbel_argmax(logits: torch.Tensor, temperatures: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """One pass over the logits: scale by temperature (0 → 1), add Gumbel noise, take the argmax."""
    scale = torch.where(temperatures > 0, temperatures, 1.0).unsqueeze(1)
    return (logits.float() / scale - torch.log(-torch.log(uniform))).argmax(dim=-1)


def _top_k_top_p(logits: torch.Tensor, top_ks: torch.Tensor, top_ps: torch.Tensor) -> torch.Tensor:
    """Mask (to -inf) tokens outside each row's top-k, then outside its top-p nucleus."""
    sorted_logits, order = logits.sort(dim=-1, descending=True)
    rank = torch.arange(logits.shape[1], device=logits.device).unsqueeze(0)
    k = torch.where(top_ks > 0, top_ks, logits.shape[1]).unsqueeze(1)
    sorted_logits = sorted_logits.masked_fill(rank >= k, float("-inf"))
    probs = torch.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs
    sorted_logits = sorted_logits.masked_fill(mass_before >= top_ps.unsqueeze(1), float("-inf"))
    return torch.full_like(logits, float("-inf")).scatter(1, order, sorted_logits)
