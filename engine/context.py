"""Per-forward attention metadata, set by the model runner and read by the attention layers."""
from dataclasses import dataclass

import torch


@dataclass
class Context:
    is_prefill: bool = False
    cu_seqlens_q: torch.Tensor | None = None   # [B+1] prefill: new tokens per row, packed
    num_decode_tokens: int = 0                 # prefill: rows [0, n) are decode rows of one token each
    max_seqlen_q: int = 0
    max_seqlen_k: int = 0
    max_prompt_context: int = 0                # prefill: the longest context among the prompt rows
    slot_mapping: torch.Tensor | None = None   # [tokens] cache slot of each new token
    context_lens: torch.Tensor | None = None   # [B] cached + new tokens per sequence
    block_tables: torch.Tensor | None = None   # [B, max_blocks]
    shared_blocks: torch.Tensor | None = None  # [1] decode: leading blocks common to every row (cascade)
    decode_order: torch.Tensor | None = None   # [decode rows] their indices, longest context first
    decode_split_plan: tuple[int, int] | None = None  # eager steps: split the first rows of the order (the long ones)


_CONTEXT = Context()


def get_context() -> Context:
    return _CONTEXT


def set_context(**fields) -> None:
    global _CONTEXT
    _CONTEXT = Context(**fields)


def reset_context() -> None:
    global _CONTEXT
    _CONTEXT = Context()
