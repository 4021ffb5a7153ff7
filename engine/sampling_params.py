"""Per-request sampling settings, validated on construction."""
import json
from dataclasses import dataclass, replace

MAX_LOGPROBS = 20  # most alternatives per token that logprobs / prompt_logprobs may ask for
MAX_LOGIT_BIAS = 100.0
COMPLETION_SEEDS = 1 << 62  # derived seeds of completions 1..n-1 of a seeded request lie in [0, COMPLETION_SEEDS)
STRUCTURED_FIELDS = ("json_schema", "json_object", "regex", "choice", "grammar")


@dataclass
class SamplingParams:
    """How to sample one request. ``temperature=0`` is greedy; ``seed`` makes sampling reproducible per request.

    ``logprobs=k`` / ``prompt_logprobs=k``: each generated / prompt token's logprob and the top-k alternatives,
    from the model's raw logits (before penalties, grammar masks and temperature). Penalties, ``min_tokens`` and
    ``logit_bias`` have vLLM's meanings. At most one of :data:`STRUCTURED_FIELDS` constrains the output.
    ``n`` draws that many completions of the prompt, each with its own seed stream (see :meth:`for_completion`)."""
    temperature: float = 1.0
    top_k: int = -1
    top_p: float = 1.0
    min_p: float = 0.0
    max_tokens: int = 64
    ignore_eos: bool = False
    stop: list[str] | str | None = None
    stop_token_ids: list[int] | None = None
    seed: int | None = None
    n: int = 1
    min_tokens: int = 0
    logprobs: int | None = None
    prompt_logprobs: int | None = None
    repetition_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[int, float] | None = None
    json_schema: dict | str | None = None
    json_object: bool = False
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.logit_bias = dict(self.logit_bias or {})
        for field, ok, why in self._checks():
            if not ok:
                raise ValueError(f"SamplingParams.{field}={getattr(self, field)!r} {why}")
        chosen = [f for f in STRUCTURED_FIELDS if getattr(self, f) not in (None, False)]
        if len(chosen) > 1:
            raise ValueError(f"SamplingParams: at most one of {', '.join(STRUCTURED_FIELDS)} may be set, "
                             f"got {', '.join(chosen)}")

    def _checks(self) -> list[tuple[str, bool, str]]:
        return [
            ("temperature", _is_number(self.temperature) and self.temperature >= 0, "must be a number >= 0"),
            ("top_k", _is_int(self.top_k) and (self.top_k == -1 or self.top_k >= 1), "must be -1 (off) or an int >= 1"),
            ("top_p", _is_number(self.top_p) and 0 < self.top_p <= 1, "must be in (0, 1]"),
            ("min_p", _is_number(self.min_p) and 0 <= self.min_p <= 1, "must be in [0, 1]"),
            ("max_tokens", _is_int(self.max_tokens) and self.max_tokens >= 1, "must be an int >= 1"),
            ("min_tokens", _is_int(self.min_tokens) and 0 <= self.min_tokens <= _or(self.max_tokens, 0),
             "must be an int in [0, max_tokens]"),
            ("ignore_eos", isinstance(self.ignore_eos, bool), "must be a bool"),
            ("stop", all(isinstance(s, str) and s for s in self.stop), "must be non-empty strings"),
            ("stop_token_ids", all(_is_int(t) and t >= 0 for t in self.stop_token_ids), "must be ints >= 0"),
            ("seed", self.seed is None or _is_int(self.seed), "must be None or an int"),
            ("n", _is_int(self.n) and self.n >= 1, "must be an int >= 1"),
            ("logprobs", _is_optional_count(self.logprobs), f"must be None or an int in [0, {MAX_LOGPROBS}]"),
            ("prompt_logprobs", _is_optional_count(self.prompt_logprobs),
             f"must be None or an int in [0, {MAX_LOGPROBS}]"),
            ("repetition_penalty", _is_number(self.repetition_penalty) and self.repetition_penalty > 0,
             "must be a number > 0 (1 is off)"),
            ("presence_penalty", _is_number(self.presence_penalty) and -2 <= self.presence_penalty <= 2,
             "must be in [-2, 2]"),
            ("frequency_penalty", _is_number(self.frequency_penalty) and -2 <= self.frequency_penalty <= 2,
             "must be in [-2, 2]"),
            ("logit_bias", all(_is_int(t) and t >= 0 and _is_number(b) and abs(b) <= MAX_LOGIT_BIAS
                               for t, b in self.logit_bias.items()),
             f"must map token ids >= 0 to biases in [-{MAX_LOGIT_BIAS:g}, {MAX_LOGIT_BIAS:g}]"),
            ("json_schema", self.json_schema is None or _is_json_schema(self.json_schema),
             "must be None, a dict or a JSON string"),
            ("json_object", isinstance(self.json_object, bool), "must be a bool"),
            ("regex", self.regex is None or (isinstance(self.regex, str) and self.regex != ""),
             "must be None or a non-empty string"),
            ("choice", self.choice is None or (isinstance(self.choice, list) and len(self.choice) > 0
                                               and all(isinstance(c, str) and c for c in self.choice)),
             "must be None or a non-empty list of non-empty strings"),
            ("grammar", self.grammar is None or (isinstance(self.grammar, str) and self.grammar.strip() != ""),
             "must be None or a non-empty EBNF string"),
        ]

    def for_completion(self, i: int) -> "SamplingParams":
        """The settings of completion ``i`` of ``n``: one completion with its own seed stream (completion 0 keeps
        ``seed``, so it equals the ``n=1`` request), prompt logprobs on completion 0 only."""
        if self.n == 1:
            return self
        seed = self.seed if self.seed is None or i == 0 else (self.seed * 0x9E3779B1 + i) % COMPLETION_SEEDS
        return replace(self, n=1, seed=seed, prompt_logprobs=self.prompt_logprobs if i == 0 else None)

    @property
    def has_penalties(self) -> bool:
        """Whether a penalty that depends on the tokens so far is on (repetition, presence, frequency)."""
        return self.repetition_penalty != 1 or self.presence_penalty != 0 or self.frequency_penalty != 0

    @property
    def structured(self) -> tuple[str, str] | None:
        """The output constraint as a hashable ``(kind, spec)`` (JSON texts canonical), or None."""
        if self.json_schema is not None:
            schema = json.loads(self.json_schema) if isinstance(self.json_schema, str) else self.json_schema
            return "json_schema", json.dumps(schema, sort_keys=True)
        if self.json_object:
            return "json_object", ""
        if self.choice is not None:
            return "choice", json.dumps(self.choice)
        if self.regex is not None:
            return "regex", self.regex
        if self.grammar is not None:
            return "grammar", self.grammar
        return None


def _is_int(x: object) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and x == x  # rejects NaN


def _or(x: object, default: int) -> int:
    return x if _is_int(x) else default


def _is_optional_count(x: object) -> bool:
    return x is None or (_is_int(x) and 0 <= x <= MAX_LOGPROBS)


def _is_json_schema(x: object) -> bool:
    if isinstance(x, dict):
        return True
    try:
        return isinstance(x, str) and isinstance(json.loads(x), (dict, bool))
    except ValueError:
        return False
