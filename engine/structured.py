"""Structured outputs with xgrammar: ``json_schema``, ``json_object``, ``regex``, ``choice`` or an EBNF
``grammar`` constrains what a request may generate.

Grammars compile in a thread pool when the request is added (cached by spec, so equal specs compile once) and the
request waits for its grammar without holding up the other sequences' steps. Each step, every constrained row's
matcher fills its row of one token bitmask for the batch (xgrammar's threads, while the step's forward pass runs on
the device), which the sampling kernel applies as it reads the logits (with top-k/top-p/min-p, a masking pass runs
first); the sampled token then advances the matcher on the host. The next mask needs that token, so under async
scheduling a step with constrained rows is launched ahead without its sampling, which is queued once the step
before it is postprocessed (deferred sampling, engine/llm_engine.py): the forward pass still overlaps the host
work. A sequence whose grammar ended (or that finished otherwise) on the token before gets an all-allowed mask row,
and the token sampled for it is dropped."""
import json
import re
import threading
import time
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

import numpy as np
import torch

from engine.logger import get_logger

logger = get_logger(__name__)
COMPILE_THREADS = 2
FILL_THREADS: int | str = "auto"  # xgrammar's threads filling a step's bitmask; "auto": half the cores
_XGRAMMAR_PREFIX = re.compile(r"^\[[\d:]+\] \S+:\d+: ")


class GrammarCompiler:
    """Compiles output constraints for one tokenizer, in the background, each distinct spec once."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        import xgrammar as xgr
        self._xgr = xgr
        self.vocab_size = vocab_size
        self.stop_token_ids = sorted(stop_token_ids)
        self._info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size,
                                                        stop_token_ids=self.stop_token_ids)
        self._compiler = xgr.GrammarCompiler(self._info)
        self._pool = ThreadPoolExecutor(COMPILE_THREADS, thread_name_prefix="grammar-compile")
        self._compiled: dict[tuple[str, str], Future] = {}
        self._lock = threading.Lock()  # the engine and a caller checking requests ahead (pipeline actors) submit

    def submit(self, spec: tuple[str, str]) -> Future:
        """A future of the compiled grammar of ``spec`` (``SamplingParams.structured``); its result raises
        ValueError when the spec does not compile."""
        with self._lock:
            if spec not in self._compiled:
                self._compiled[spec] = self._pool.submit(self._compile, spec)
            return self._compiled[spec]

    def _compile(self, spec: tuple[str, str]):
        start = time.perf_counter()
        compiled = self._compiler.compile_grammar(parse_spec(spec))
        logger.debug("Compiled %s grammar in %.1f ms", spec[0], (time.perf_counter() - start) * 1e3)
        return compiled

    def matcher(self, compiled):
        """A fresh ``xgrammar.GrammarMatcher`` at the start of ``compiled``."""
        return self._xgr.GrammarMatcher(compiled)

    def shutdown(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


def parse_spec(spec: tuple[str, str]):
    """The ``xgrammar.Grammar`` of an output constraint (``SamplingParams.structured``); ValueError naming the
    kind when it does not parse. Needs no tokenizer, so a job checks its flags with it before engines start."""
    import xgrammar as xgr
    kind, text = spec
    try:
        if kind == "json_schema":
            return xgr.Grammar.from_json_schema(text, any_whitespace=False)
        if kind == "json_object":
            return xgr.Grammar.builtin_json_grammar()
        if kind == "regex":
            return xgr.Grammar.from_regex(text)
        if kind == "choice":
            return xgr.Grammar.from_ebnf("root ::= " + " | ".join(json.dumps(c, ensure_ascii=False)
                                                                  for c in json.loads(text)))
        return xgr.Grammar.from_ebnf(text)
    except RuntimeError as e:  # xgrammar reports bad specs as RuntimeError, prefixed "[time] file.cc:line: "
        raise ValueError(f"{kind} does not compile: {_XGRAMMAR_PREFIX.sub('', str(e).strip())}") from None


def accept_tokens(matchers: list, token_ids: list[int]) -> list[bool]:
    """Move each matcher past its sampled token (in one call into xgrammar); False where the grammar does not
    allow it."""
    import xgrammar as xgr
    return xgr.BatchGrammarMatcher.batch_accept_token(matchers, token_ids)


class TokenBitmask:
    """The batch's grammar bitmask ``[rows, ceil(V / 32)]``: a pinned host buffer that xgrammar's thread pool fills
    (the constrained rows; the others allow every token) and its device copy, both kept from step to step. On CUDA
    the copy runs on a side stream, so a mask filled while a forward pass runs reaches the device without queueing
    behind it. Reusing the buffers is safe because a mask is filled only once the previous step's tokens were read
    (the engine samples a step with constrained rows after postprocessing the step before it), so the previous mask
    has been applied."""

    def __init__(self, vocab_size: int, device: torch.device):
        import xgrammar as xgr
        self.vocab_size, self.device = vocab_size, device
        self._filler = xgr.BatchGrammarMatcher(max_threads=FILL_THREADS)
        self._stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._host = self._device = torch.empty(0, 0, dtype=torch.int32)
        self._allows_all = np.ones(0, dtype=bool)  # host rows that still hold an all-allowed mask

    def fill(self, matchers: list[tuple[int, object]], num_rows: int) -> torch.Tensor:
        """The bitmask of a batch of ``num_rows`` on the device: row ``row`` from each ``(row, matcher)``, every
        token allowed in the other rows."""
        self._reserve(num_rows)
        rows = [row for row, _ in matchers]
        self._filler.batch_fill_next_token_bitmask([m for _, m in matchers], self._host, indices=rows)
        free = np.ones(num_rows, dtype=bool)
        free[rows] = False
        stale = free & ~self._allows_all[:num_rows]  # free now, filled by a matcher in an earlier step
        if stale.any():
            self._host.numpy()[:num_rows][stale] = -1  # all bits set
        self._allows_all[:num_rows] = free
        if self._stream is None:
            return self._host[:num_rows]
        mask = self._device[:num_rows]
        with torch.cuda.stream(self._stream):
            mask.copy_(self._host[:num_rows], non_blocking=True)
        torch.cuda.current_stream(self.device).wait_stream(self._stream)
        return mask

    def _reserve(self, num_rows: int) -> None:
        if self._host.shape[0] >= num_rows:
            return
        import xgrammar as xgr
        host = xgr.allocate_token_bitmask(max(num_rows, 2 * self._host.shape[0]), self.vocab_size)  # all allowed
        self._allows_all = np.ones(host.shape[0], dtype=bool)
        if self._stream is None:
            self._host = self._device = host
            return
        self._host, self._device = host.pin_memory(), torch.empty_like(host, device=self.device)
        # The new device buffer comes from the compute stream's pool: memory that work already queued there (the
        # forward pass in flight) may still use. The side stream must not write it before that work is done.
        self._stream.wait_stream(torch.cuda.current_stream(self.device))


def apply_bitmask(logits: torch.Tensor, bitmask: torch.Tensor) -> torch.Tensor:
    """Set the logits of disallowed tokens to -inf (in place, after a cast to float32)."""
    import xgrammar as xgr
    logits = logits.float()
    xgr.apply_token_bitmask_inplace(logits, bitmask, vocab_size=logits.shape[1])
    return logits


class GrammarError(ValueError):
    """A request's output constraint did not compile."""

    def __init__(self, seq, error: BaseException):
        super().__init__(str(error))
        self.seq = seq


class GrammarQueue:
    """Requests waiting for their grammar; the compiler starts with the first constrained request."""

    def __init__(self, tokenizer, vocab_size: int, stop_token_ids: list[int]):
        self._compiler_args = tokenizer, vocab_size, stop_token_ids
        self._compiler: GrammarCompiler | None = None
        self._lock = threading.Lock()
        self.waiting: list[tuple[object, Future]] = []  # (Sequence, its compiled grammar)

    @property
    def compiler(self) -> GrammarCompiler:
        with self._lock:
            if self._compiler is None:
                self._compiler = GrammarCompiler(*self._compiler_args)
            return self._compiler

    def submit(self, params) -> Future | None:
        """Start compiling the constraint of a ``SamplingParams`` (None when it has none)."""
        spec = params.structured
        return self.compiler.submit(spec) if spec is not None else None

    def add(self, seq) -> None:
        self.waiting.append((seq, self.submit(seq.params)))

    def ready(self, block: bool) -> list:
        """The waiting sequences whose grammar has compiled, each given its matcher (``seq.grammar``). With
        ``block``, wait until at least one has. Raises GrammarError for (and drops) one that did not compile."""
        if block and self.waiting:
            wait([f for _, f in self.waiting], return_when=FIRST_COMPLETED)
        done = [(seq, f) for seq, f in self.waiting if f.done()]
        for seq, future in done:
            if future.exception() is not None:
                self.waiting.remove((seq, future))
                raise GrammarError(seq, future.exception())
        self.waiting = [(seq, f) for seq, f in self.waiting if not f.done()]
        for seq, future in done:
            seq.grammar = self.compiler.matcher(future.result())
        return [seq for seq, _ in done]

    def shutdown(self) -> None:
        if self._compiler is not None:
            self._compiler.shutdown()
