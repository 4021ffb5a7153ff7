"""Per-request sampling settings, validated on construction."""
from dataclasses import dataclass


@dataclass
class SamplingParams:
    """How to sample one request. ``temperature=0`` is greedy; ``seed`` makes sampling reproducible per request."""
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    max_tokens: int = 64
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        checks = [
            ("temperature", _is_number(self.temperature) and self.temperature >= 0, "must be a number >= 0"),
            ("top_k", _is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "must be -1 (off) or an int >= 1"),
            ("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", _is_number(self.min_p) and 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 1, "must be an int >= 1"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "must be a bool"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "must be ints >= 0"),
            ("seed", self.seed is None or _is_int(self.seed), "must be None or an int"),
        ]
        for field, ok, why in checks:
            if not ok:
                raise ValueError(f"SamplingParams.{field}={getattr(self, field)!r} {why}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # rejects NaN
