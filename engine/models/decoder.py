"""One decoder-only transformer covering Qwen3, Qwen2/2.5, Llama 3 and Mistral.

They differ only in switches read from the HF config: q/k RMSNorm (Qwen3), q/k/v bias (Qwen2),
rope scaling (Llama 3), tied embeddings. Parameter names follow the HF checkpoints, except that
q/k/v and gate/up are packed (see ``packed_modules``).

The residual stream is kept in fp32 whatever the model's dtype (HF keeps it in the model's dtype). Real
checkpoints carry "massive activations": in SmolLM2-135M a few channels hold ~25,000 from layer 11 on, where
a bf16 step is 128, so every bf16 residual add shifts the RMSNorm scale of all other channels. With the
stream in fp32 the bf16 engine's logits sit about 40 % closer to an fp32 run than HF's bf16 run does
(docs/benchmarks.md, "Real checkpoints"); the layers still compute in the model's dtype.
"""
import logging

import torch
from torch import nn
from transformers import PretrainedConfig

from engine.config import head_dim_of
from engine.context import get_context
from engine.distributed import tp_size
from engine.layers.attention import Attention
from engine.layers.fusion import qk_norm_rotary_store, silu_and_mul
from engine.layers.embed_head import ParallelLMHead, VocabParallelEmbedding
from engine.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from engine.layers.norm import RMSNorm
from engine.layers.rotary import RotaryEmbedding
from engine.logger import get_logger

logger = get_logger(__name__)


def rope_settings(config: PretrainedConfig) -> tuple[float, dict | None]:
    """(theta, scaling) from either transformers 5's ``rope_parameters`` or the older fields."""
    params = getattr(config, "rope_parameters", None) or {}
    theta = params.get("rope_theta", getattr(config, "rope_theta", 10000.0))
    scaling = params if params.get("rope_type", "default") != "default" else getattr(config, "rope_scaling", None)
    return theta, scaling


class DecoderAttention(nn.Module):
    def __init__(self, config: PretrainedConfig, qk_norm: bool, qkv_bias: bool):
        super().__init__()
        self.head_dim = head_dim_of(config)
        self.qkv_proj = QKVParallelLinear(config.hidden_size, self.head_dim, config.num_attention_heads,
                                          config.num_key_value_heads,
                                          bias=qkv_bias or getattr(config, "attention_bias", False))
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.num_attention_heads * self.head_dim, config.hidden_size,
                                        bias=getattr(config, "attention_bias", False) and not qkv_bias)
        theta, scaling = rope_settings(config)
        self.rotary = RotaryEmbedding(self.head_dim, config.max_position_embeddings, theta, scaling)
        self.attn = Attention(self.num_heads, self.num_kv_heads, self.head_dim, self.head_dim ** -0.5)
        # q/k norms (Qwen3): their weights, applied by the prologue in forward
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps) if qk_norm else None
        self.rms_norm_eps = config.rms_norm_eps

    def project(self, positions: torch.Tensor, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, bool]:
        """q ``[tokens, heads, dim]``, k and v ``[tokens, kv_heads, dim]`` after the prologue (q/k norm, rotary, and on
        CUDA the KV-cache store), and whether the prologue stored k and v."""
        q_size, kv_size = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        q, k, v = self.qkv_proj(x).split([q_size, kv_size, kv_size], dim=-1)
        q = q.view(-1, self.num_heads, self.head_dim)
        k = k.view(-1, self.num_kv_heads, self.head_dim)
        v = v.view(-1, self.num_kv_heads, self.head_dim)
        norm_weights = (self.q_norm.weight, self.k_norm.weight) if self.q_norm is not None else None
        q, k, kv_stored = qk_norm_rotary_store(positions, q, k, v, self.rotary.cos, self.rotary.sin, norm_weights,
                                               self.rms_norm_eps, self.attn.k_cache, self.attn.v_cache,
                                               get_context().slot_mapping)
        return q, k, v, kv_stored

    def forward(self, positions: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        q, k, v, kv_stored = self.project(positions, x)
        return self.o_proj(self.attn(q, k, v, kv_stored=kv_stored).flatten(1, -1))


class DecoderMLP(nn.Module):
    def __init__(self, config: PretrainedConfig):
        super().__init__()
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act={config.hidden_act!r} is not supported (only silu)")
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [config.intermediate_size] * 2)
        self.down_proj = RowParallelLinear(config.intermediate_size, config.hidden_size,
                                           bias=getattr(config, "mlp_bias", False))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The MLP's output as the next residual-add RMSNorm takes it (see ``RowParallelLinear.partial_sums``)."""
        return self.down_proj.partial_sums(silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, config: PretrainedConfig, qk_norm: bool, qkv_bias: bool):
        super().__init__()
        self.self_attn = DecoderAttention(config, qk_norm, qkv_bias)
        self.mlp = DecoderMLP(config)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def attention_inputs(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None):
        """The layer up to its attention: ``(q, k, v, kv_stored, residual)`` (see ``DecoderAttention.project``)."""
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden.float()
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        return *self.self_attn.project(positions, hidden), residual

    def attention_outputs(self, attn_out: torch.Tensor, residual: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer after its attention (``attn_out`` ``[tokens, heads, dim]``): ``(hidden, residual)``."""
        attn_out = self.self_attn.o_proj.partial_sums(attn_out.flatten(1, -1))
        hidden, residual = self.post_attention_layernorm(attn_out, residual)
        return self.mlp(hidden), residual

    def forward(self, positions, hidden, residual):
        q, k, v, kv_stored, residual = self.attention_inputs(positions, hidden, residual)
        return self.attention_outputs(self.self_attn.attn(q, k, v, kv_stored=kv_stored), residual)


class DecoderModel(nn.Module):
    def __init__(self, config: PretrainedConfig, qk_norm: bool, qkv_bias: bool):
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(config, qk_norm, qkv_bias) for _ in range(config.num_hidden_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        hidden, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            hidden, residual = layer(positions, hidden, residual)
        hidden, _ = self.norm(hidden, residual)
        return hidden

    def piece(self, i: int, positions: torch.Tensor, x: torch.Tensor, residual: torch.Tensor | None):
        """Piece ``i`` of the forward pass cut at its attention calls (CUDA graphs are captured around them, see
        engine/cuda_graphs.py). Piece 0 embeds the token ids ``x``; piece ``i > 0`` takes layer ``i - 1``'s attention
        output ``x`` through the rest of that layer. Each then returns layer ``i``'s ``attention_inputs``, except
        the last piece (``i == len(layers)``), which returns the final hidden states."""
        if i == 0:
            hidden, residual = self.embed_tokens(x), None
        else:
            hidden, residual = self.layers[i - 1].attention_outputs(x, residual)
        if i == len(self.layers):
            return self.norm(hidden, residual)[0]
        return self.layers[i].attention_inputs(positions, hidden, residual)


class DecoderForCausalLM(nn.Module):
    packed_modules = {
        "q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: PretrainedConfig, qk_norm: bool = False, qkv_bias: bool = False):
        super().__init__()
        self.model = DecoderModel(config, qk_norm, qkv_bias)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        if logger.isEnabledFor(logging.INFO):
            logger.info("Model config: num_layers=%d, hidden_size=%d, num_heads=%d, num_kv_heads=%d, "
                        "head_dim=%d, vocab_size=%d, tp_size=%d", config.num_hidden_layers, config.hidden_size,
                        config.num_attention_heads, config.num_key_value_heads, head_dim_of(config),
                        config.vocab_size, tp_size())

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids, positions)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        return self.lm_head(hidden)


ARCHITECTURES = {
    "Qwen3ForCausalLM": dict(qk_norm=True),
    "Qwen2ForCausalLM": dict(qkv_bias=True),
    "LlamaForCausalLM": dict(),
    "MistralForCausalLM": dict(),  # Llama's layers; its sliding window caps max_model_len (config.attention_window)
}


def build_model(config: PretrainedConfig) -> DecoderForCausalLM:
    """Instantiate the model named by ``config.architectures`` (see ``ARCHITECTURES``)."""
    for arch in getattr(config, "architectures", None) or []:
        if arch in ARCHITECTURES:
            return DecoderForCausalLM(config, **ARCHITECTURES[arch])
    raise ValueError(f"unsupported architectures {config.architectures}; supported: {sorted(ARCHITECTURES)}")
