"""Linear layers split across tensor-parallel ranks.

Column-parallel layers hold a slice of the output features; row-parallel layers a slice of the input
features and sum partial results with an all-reduce. Each parameter carries a ``weight_loader`` that cuts
this rank's slice out of the full checkpoint tensor (and, for packed layers, places it in its shard).
"""
import torch
import torch.nn.functional as F
from torch import nn

from engine.distributed import all_reduce, tp_rank, tp_size
from engine.layers.fusion import use_triton_kernels

# RowParallelLinear.partial_sums: above this many rows cuBLAS is as fast. In W1 on an H200 (docs/benchmarks.md,
# 2026-12-04, fifth session) decode steps of 1-127 rows were faster with split-K (96-127 rows by only 0.06 ms), of
# 128-256 rows 0.11-0.18 ms slower; the limit keeps clear of that crossover.
SPLIT_K_MAX_ROWS = 96


def split_size(total: int, parts: int, what: str) -> int:
    if total % parts:
        raise ValueError(f"{what}={total} is not divisible by tensor_parallel_size={parts}")
    return total // parts


class LinearBase(nn.Module):
    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.tp_rank, self.tp_size = tp_rank(), tp_size()
        self.weight = nn.Parameter(torch.empty(out_features, in_features), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.bias = None
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False)
            self.bias.weight_loader = self.weight_loader

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class ColumnParallelLinear(LinearBase):
    """Output features split across ranks: this rank holds rows [rank*n, (rank+1)*n)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(in_features, split_size(out_features, tp_size(), "output features"), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        n = param.shape[0]
        param.data.copy_(loaded.narrow(0, self.tp_rank * n, n))


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel outputs packed in one matrix (e.g. gate and up projections)."""

    def __init__(self, in_features: int, output_sizes: list[int], bias: bool = False):
        self.output_sizes = output_sizes
        super().__init__(in_features, sum(output_sizes), bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: int) -> None:
        size = self.output_sizes[shard_id] // self.tp_size
        offset = sum(self.output_sizes[:shard_id]) // self.tp_size
        param.data.narrow(0, offset, size).copy_(loaded.narrow(0, self.tp_rank * size, size))


class QKVParallelLinear(ColumnParallelLinear):
    """Packed q/k/v. Query heads split across ranks; KV heads split too, or replicated when there are
    fewer KV heads than ranks (each rank keeps the KV head its query heads attend to)."""

    def __init__(self, hidden_size: int, head_dim: int, num_heads: int, num_kv_heads: int, bias: bool = False):
        tp = tp_size()
        self.head_dim = head_dim
        self.num_heads = split_size(num_heads, tp, "num_attention_heads")
        self.num_kv_heads = max(1, num_kv_heads // tp)
        if num_kv_heads >= tp:
            split_size(num_kv_heads, tp, "num_key_value_heads")
        elif tp % num_kv_heads:
            raise ValueError(f"tensor_parallel_size={tp} is not a multiple of num_key_value_heads={num_kv_heads}")
        self.total_kv_heads = num_kv_heads
        out = (self.num_heads + 2 * self.num_kv_heads) * head_dim
        LinearBase.__init__(self, hidden_size, out, bias)

    def kv_head_start(self) -> int:
        """First global KV head this rank holds."""
        if self.total_kv_heads >= self.tp_size:
            return self.tp_rank * self.num_kv_heads
        return self.tp_rank * self.total_kv_heads // self.tp_size

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: str) -> None:
        d = self.head_dim
        q_size, kv_size = self.num_heads * d, self.num_kv_heads * d
        if shard_id == "q":
            offset, src = 0, loaded.narrow(0, self.tp_rank * q_size, q_size)
        else:
            offset = q_size if shard_id == "k" else q_size + kv_size
            src = loaded.narrow(0, self.kv_head_start() * d, kv_size)
        param.data.narrow(0, offset, src.shape[0]).copy_(src)


class RowParallelLinear(LinearBase):
    """Input features split across ranks; partial outputs summed with an all-reduce. Bias added once."""

    def __init__(self, in_features: int, out_features: int, bias: bool = False):
        super().__init__(split_size(in_features, tp_size(), "input features"), out_features, bias)

    def weight_loader(self, param: nn.Parameter, loaded: torch.Tensor) -> None:
        if param.dim() == 1:  # bias: not split
            param.data.copy_(loaded)
            return
        n = param.shape[1]
        param.data.copy_(loaded.narrow(1, self.tp_rank * n, n))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.linear(x, self.weight, self.bias if self.tp_rank == 0 else None)
        return all_reduce(y)

    def partial_sums(self, x: torch.Tensor) -> torch.Tensor:
        """``forward(x)`` for a caller that passes it straight to ``add_rms_norm``: for a decode-sized batch of a
        half-precision model on one GPU (no bias, fused kernels on), its split-K partial sums instead
        (``engine.kernels.triton_gemm``), which that norm adds up."""
        if (self.tp_size == 1 and self.bias is None and x.dim() == 2 and x.shape[0] <= SPLIT_K_MAX_ROWS
                and x.dtype in (torch.bfloat16, torch.float16) and use_triton_kernels(x)):
            from engine.kernels.triton_gemm import split_k_linear  # imports Triton only on CUDA
            return split_k_linear(x if x.stride(-1) == 1 else x.contiguous(), self.weight)
        return self.forward(x)
