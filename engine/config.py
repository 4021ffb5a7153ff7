"""Engine configuration: user arguments checked once, plus what is derived from the model's HF config and,
for ``max_num_seqs``, from the size of the KV cache."""
from dataclasses import MISSING, dataclass, field, fields
from types import SimpleNamespace

import torch
from transformers import AutoConfig, PretrainedConfig

from engine.logger import get_logger

logger = get_logger(__name__)
MAX_NUM_SEQS = 1024        # the largest default running set
TYPICAL_SEQ_TOKENS = 1024  # prompt + completion of a typical request, for sizing the default running set


@dataclass
class Config:
    model: str
    device: str | None = None
    tensor_parallel_size: int = 1
    enforce_eager: bool = False
    max_model_len: int = 4096
    max_num_seqs: int | None = None  # running sequences at most; None: fitted to the KV cache (default_max_num_seqs)
    max_num_batched_tokens: int = 16384  # tokens forwarded per step; longer prompts are prefilled in chunks
    # prompt work in a step with decode rows, in tokens of short-context work (scheduler.prompt_work), beside
    # fewer than scheduler.PROMPT_CAP_ROWS decode rows scaled up (scheduler.prompt_work_cap); None: no cap
    max_prefill_tokens_with_decodes: int | None = 3072
    gpu_memory_utilization: float = 0.9
    kvcache_block_size: int = 128
    enable_prefix_caching: bool = True
    async_scheduling: bool = True  # schedule the next decode step while the current one runs (1 GPU/CPU)
    dtype: str = "auto"
    seed: int = 0
    num_kvcache_blocks: int | None = None  # fixed block count; None = size from memory
    hf_config: PretrainedConfig | None = field(default=None, repr=False)
    torch_dtype: torch.dtype | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        self.device = self.device or ("cuda" if torch.cuda.is_available() else "cpu")
        check_values(self)
        if self.device == "cuda" and not torch.cuda.is_available():
            raise ValueError("device='cuda' but CUDA is not available")
        if self.device == "cuda" and self.tensor_parallel_size > torch.cuda.device_count():
            raise ValueError(f"tensor_parallel_size={self.tensor_parallel_size} exceeds the "
                             f"{torch.cuda.device_count()} visible GPUs")
        self.hf_config = AutoConfig.from_pretrained(self.model)
        self.max_model_len = min(self.max_model_len, self.hf_config.max_position_embeddings)
        window = attention_window(self.hf_config)
        if window is not None and window < self.max_model_len:
            logger.warning("The model attends over a sliding window of %d tokens, which this engine does not "
                           "implement: max_model_len %d -> %d, where full attention is the same", window,
                           self.max_model_len, window)
            self.max_model_len = window
        self.torch_dtype = self._resolve_dtype()
        if self.device == "cpu":
            self.enforce_eager = True

    def _resolve_dtype(self) -> torch.dtype:
        if self.dtype != "auto":
            return getattr(torch, self.dtype)
        if self.device == "cpu":
            return torch.float32
        stored = getattr(self.hf_config, "dtype", None) or getattr(self.hf_config, "torch_dtype", None)
        stored = getattr(torch, stored) if isinstance(stored, str) else stored
        return stored if stored in (torch.bfloat16, torch.float16) else torch.bfloat16

    @property
    def max_blocks_per_seq(self) -> int:
        return -(-self.max_model_len // self.kvcache_block_size)

    @property
    def max_num_seqs_limit(self) -> int:
        """``max_num_seqs``, or before it is fitted to the KV cache, the most it can become."""
        return self.max_num_seqs or min(MAX_NUM_SEQS, self.max_num_batched_tokens)

    @property
    def attention_break_even(self) -> float:
        """Keys at which a token's attention (4 * heads * head_dim FLOPs a key: QK and PV) costs as many FLOPs as
        its linear layers (2 a weight): about 3,840 for Qwen3-0.6B. The scheduler weighs prompt tokens by it."""
        c, head_dim = self.hf_config, head_dim_of(self.hf_config)
        weights = (c.hidden_size * head_dim * 2 * (c.num_attention_heads + c.num_key_value_heads)
                   + 3 * c.hidden_size * c.intermediate_size)
        return weights / (2 * c.num_attention_heads * head_dim)

    def default_max_num_seqs(self, num_kv_blocks: int) -> int:
        """``max_num_seqs`` when left None: as many sequences of TYPICAL_SEQ_TOKENS (or max_model_len, if
        shorter) as the KV cache holds, from 1 to ``max_num_seqs_limit`` (a larger running set would mostly
        preempt)."""
        per_seq = min(self.max_model_len, TYPICAL_SEQ_TOKENS)
        return max(1, min(self.max_num_seqs_limit, num_kv_blocks * self.kvcache_block_size // per_seq))


def attention_window(config: PretrainedConfig) -> int | None:
    """The sliding attention window of the model's windowed layers (a token sees itself and the window - 1 before
    it), or None when every layer attends to the whole context: Mistral v0.1 sets ``sliding_window`` alone; Qwen2's
    transformers 5 config lists its windowed layers in ``layer_types`` (older ones say ``use_sliding_window``)."""
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return getattr(config, "sliding_window", None)


def head_dim_of(config: PretrainedConfig) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def check_values(args) -> None:
    """ValueError naming the first setting of ``args`` (a Config, or any object with its fields) that is out of
    range or of the wrong type. Needs no model: a job checks its engine arguments with it before actors start."""
    bs, tp, seqs, tokens = args.kvcache_block_size, args.tensor_parallel_size, args.max_num_seqs, \
        args.max_num_batched_tokens
    checks = [
        ("device", lambda: args.device in (None, "cuda", "cpu"), "must be 'cuda', 'cpu' or None"),
        ("kvcache_block_size", lambda: isinstance(bs, int) and 16 <= bs <= 256 and bs & (bs - 1) == 0,
         "must be a power of two from 16 to 256"),
        ("tensor_parallel_size", lambda: isinstance(tp, int) and tp >= 1, "must be an int >= 1"),
        ("max_model_len", lambda: args.max_model_len >= 1, "must be >= 1"),
        ("max_num_batched_tokens", lambda: tokens >= 1, "must be >= 1"),
        ("max_prefill_tokens_with_decodes", lambda: args.max_prefill_tokens_with_decodes is None
         or args.max_prefill_tokens_with_decodes >= 1, "must be None or >= 1"),
        ("max_num_seqs", lambda: seqs is None or 1 <= seqs <= tokens,
         f"must be None or from 1 to max_num_batched_tokens={tokens} (every running sequence's decode token must "
         "fit in one step)"),
        ("gpu_memory_utilization", lambda: 0 < args.gpu_memory_utilization <= 1, "must be in (0, 1]"),
        ("dtype", lambda: args.dtype in ("auto", "float32", "float16", "bfloat16"),
         "must be auto, float32, float16 or bfloat16"),
        ("num_kvcache_blocks", lambda: args.num_kvcache_blocks is None or args.num_kvcache_blocks >= 1,
         "must be >= 1"),
    ]
    for name, ok, why in checks:
        try:
            valid = ok()
        except TypeError:  # e.g. a string where a number belongs
            valid = False
        if not valid:
            raise ValueError(f"{name}={getattr(args, name)!r} {why}")


def check_engine_args(**kwargs) -> None:
    """``check_values`` of ``LLM(**kwargs)``'s settings (the defaults for the rest), without loading anything."""
    defaults = {f.name: f.default for f in fields(Config) if f.default is not MISSING}
    check_values(SimpleNamespace(**{**defaults, **kwargs}))
