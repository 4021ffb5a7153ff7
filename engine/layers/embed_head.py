"""Vocabulary-parallel embedding and LM head: each rank holds a contiguous slice of the vocabulary."""
import torch
import torch.nn.functional as F
from torch import nn

from engine.context import get_context
from engine.distributed import all_reduce, gather_to_first, tp_rank, tp_size
from engine.layers.linear import split_size


class VocabParallelEmbedding(nn.Module):
    def __init__(self, vocab_size: int, hidden_size: int):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.vocab_size = vocab_size
        self.shard_size = split_size(vocab_size, self.tp_size, "vocab_size")
        self.vocab_start = self.tp_rank * self.shard_size
        self.weight = nn.Parameter(torch.empty(self.shard_size, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        param.data.copy_(loaded.narrow(0, self.vocab_start, self.shard_size))

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.vocab_start
        mine = (local >= 0) & (local < self.shard_size)
        y = F.embedding(local * mine, self.weight) * mine.unsqueeze(-1).to(self.weight.dtype)
        return all_reduce(y)


class ParallelLMHead(VocabParallelEmbedding):
    """Logits for the last token of each sequence (prefill) or every token (decode), gathered on rank 0."""

    def forward(self, hidden: torch.Tensor) -> torch.Tensor | None:
        ctx = get_context()
        if ctx.is_prefill:
            hidden = hidden[ctx.cu_seqlens_q[1:] - 1].contiguous()
        return self.logits(hidden)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """Logits of every row of ``hidden`` (whatever the phase), gathered on rank 0."""
        return gather_to_first(F.linear(hidden, self.weight), dim=-1)
