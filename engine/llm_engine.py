"""The user-facing engine: prompts in, completions out. Tokenises and validates requests, drives the
scheduler and model runner one step at a time, applies stop strings, and reports timings and step metrics.

Async scheduling: each step launches the next one before reading its own tokens; the next step's forward pass
reads them on the device. Sampling a row with a grammar or a token penalty needs the previous token on the host
(to advance the grammar matcher and fill the mask, or to count the tokens), so a step with such rows is launched
ahead in two parts (deferred sampling): its forward pass at once, its sampling once the current step's tokens
are read and postprocessed. The forward pass thus runs on the device during that host work, and the step after
it is launched after the sampling was queued, so its pending inputs read the right tokens (one stream, launch
order)."""
import atexit
import gc
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING

import numpy as np
from tqdm.auto import tqdm

from engine.config import Config
from engine.loader import resolve_model_path
from engine.logger import get_logger, memory_summary
from engine.metrics import StepRecord
from engine.model_runner import ModelRunner, SampledTokens, StepLogits
from engine.outputs import SchedulerOutput, StepOutput
from engine.sampling_params import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import LogprobStaging, Sequence
from engine.structured import GrammarError, GrammarQueue, accept_tokens

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

logger = get_logger(__name__)
Prompt = str | list[int] | list[dict]
RULE = "-" * 80
PROMPT_FIELDS = ("num_prompt_tokens", "prompt_token_logprobs", "prompt_logprobs")
STOP_REASONS = {"eos": "stop", "stop": "stop", "max_tokens": "length", "max_model_len": "length"}


def freeze_gc() -> None:
    """Leave the objects that exist now (mostly what importing torch, transformers and Triton made: ~0.4M) out of
    Python's full garbage collections, as vLLM does. Each full collection walks every tracked object; unfrozen,
    that stalled a running batch for 0.5-1.2 s a few times per 2,048-row run on the GPU machine. They are unfrozen
    by ``shutdown`` and at exit, so that cycles among them are still collected."""
    gc.collect()
    gc.freeze()
    atexit.unregister(gc.unfreeze)
    atexit.register(gc.unfreeze)


def freeze_admitted() -> None:
    """Leave newly admitted requests out of full collections too. Their token-id lists are long-lived and hold a
    reference per token: with W5's 2,048 rows queued (and the caller's copy of the prompts) a full collection walked
    ~2.3M references, 43-59 ms on the CPU machine; an H100 made 12-15 of them (0.8-0.9 s) in every W5 run, each
    longer than the 13-22 ms step queued ahead of it on the GPU. Frozen, one takes 1-3 ms. Freezing is a list
    splice (no walk). The engine's requests and steps make no reference cycles, so they are still freed, by
    reference counting, once finished; other cycles alive at an admission wait for ``shutdown`` or exit, as those
    of start-up do."""
    gc.freeze()


@dataclass
class LaunchedStep:
    """A step queued on the device; its tokens are read when it completes. ``tokens`` is None while its sampling
    waits for the step before it to be postprocessed (deferred sampling: only ``logits``, its forward, is queued)."""
    batch: SchedulerOutput
    tokens: SampledTokens | None  # one per sampling row of the batch
    logits: StepLogits | None = None


def load_tokenizer(path: str) -> "PreTrainedTokenizerBase":
    """The model's HF tokenizer. Imported here, not with the engine: ``AutoTokenizer`` pulls in transformers'
    auto-model machinery (0.2 s with transformers 5.25 on the CPU machine; before 5.21 also torch._dynamo, DTensor
    and scikit-learn, 5.8 s with 5.17 on the H200 machine), and a job's driver imports the engine only to check its
    settings. (Loading it in a thread while the runners start was slower there: the two threads contend for the
    GIL.)"""
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(path)


class LLMEngine:
    def __init__(self, model: str, **kwargs):
        logger.info("=" * 80)
        logger.info("Initializing LLMEngine")
        logger.info("Model: %s", model)
        config_names = [f.name for f in fields(Config) if f.name not in ("model", "hf_config", "torch_dtype")]
        unknown = set(kwargs) - set(config_names)
        if unknown:
            raise TypeError(f"unknown LLM arguments: {sorted(unknown)}")
        self.config = Config(resolve_model_path(model), **kwargs)
        logger.info("Configuration: %s", ", ".join(f"{k}={getattr(self.config, k)}" for k in config_names))
        self.tokenizer = load_tokenizer(self.config.model)
        self.model_runner = self._start_runners()
        self.eos_token_ids = self._eos_token_ids()  # also the grammars' stop tokens
        self.scheduler = Scheduler(self.config, self.model_runner.num_blocks, self.eos_token_ids)
        self.model_runner.eos_token_ids = sorted(self.eos_token_ids)
        self.grammars = GrammarQueue(self.tokenizer, self.config.hf_config.vocab_size, sorted(self.eos_token_ids))
        # Unfinished requests (a grammar or a token penalty) whose sampling needs their previous token on the host.
        self.host_token_seq_ids: set[int] = set()
        self.logprob_staging = LogprobStaging()  # the latest steps' generated-token logprobs (engine/sequence.py)
        self.step_callbacks: list[Callable[[StepRecord], None]] = []
        # Async scheduling feeds sampled tokens to the next step on the device (single-rank runner only).
        self.async_scheduling = self.config.async_scheduling and self.config.tensor_parallel_size == 1
        self.in_flight: LaunchedStep | None = None
        self.stats = dict(steps=0, prefill_time_s=0.0, decode_time_s=0.0, prompt_tokens=0, generated_tokens=0)
        self.admitted_since_step = False  # a request was added since the last step began (see freeze_admitted)
        freeze_gc()

    def _start_runners(self) -> ModelRunner:
        if self.config.tensor_parallel_size > 1:
            from engine.tensor_parallel import TensorParallelRunner
            return TensorParallelRunner(self.config)
        return ModelRunner(self.config)

    def _eos_token_ids(self) -> set[int]:
        ids = self.config.hf_config.eos_token_id
        ids = set(ids if isinstance(ids, list) else [ids] if ids is not None else [])
        if self.tokenizer.eos_token_id is not None:
            ids.add(self.tokenizer.eos_token_id)
        return ids

    # ----- requests -------------------------------------------------------------------------------
    def encode_prompt(self, prompt: Prompt, max_tokens: int = 1) -> list[int]:
        """Token ids for a text, token-id or chat prompt; ValueError with the reason if it cannot run."""
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("prompt is empty")
            token_ids = self.tokenizer.encode(prompt)
        elif isinstance(prompt, list) and prompt and all(isinstance(m, dict) for m in prompt):
            token_ids = self._render_chat(prompt)
        elif isinstance(prompt, list) and set(map(type, prompt)) <= {int}:  # (bool is not int here)
            token_ids = list(prompt)
            vocab = self.config.hf_config.vocab_size
            if token_ids and (min(token_ids) < 0 or max(token_ids) >= vocab):
                raise ValueError(f"prompt has token ids outside the vocabulary [0, {vocab})")
        else:
            raise ValueError(f"prompt must be a string, a list of token ids or a list of chat messages, "
                             f"not {type(prompt).__name__}")
        if not token_ids:
            raise ValueError("prompt is empty")
        if len(token_ids) > self.config.max_model_len:
            raise ValueError(f"prompt has {len(token_ids)} tokens, more than max_model_len="
                             f"{self.config.max_model_len}")
        self._check_fits(len(token_ids), max_tokens)
        return token_ids

    def _render_chat(self, messages: list[dict]) -> list[int]:
        for i, m in enumerate(messages):
            if not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise ValueError(f"chat message {i} needs string 'role' and 'content' fields, got {m!r}")
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("the model's tokenizer has no chat template, so chat messages cannot be rendered")
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return self.tokenizer.encode(text, add_special_tokens=False)

    def _check_fits(self, num_prompt_tokens: int, max_tokens: int) -> None:
        """Reject a request whose longest possible sequence exceeds the whole KV cache (it could never finish)."""
        longest = min(num_prompt_tokens + max_tokens, self.config.max_model_len)
        needed = -(-longest // self.config.kvcache_block_size)
        if needed > self.model_runner.num_blocks:
            raise ValueError(f"request needs up to {needed} KV-cache blocks ({longest} tokens) but the cache holds "
                             f"only {self.model_runner.num_blocks} blocks of {self.config.kvcache_block_size}")

    def add_request(self, prompt: Prompt, params: SamplingParams, index: int = 0) -> Sequence:
        """Queue one request (validated as in :meth:`encode_prompt`); it runs from the next step on. For ``n > 1``
        use :meth:`generate`, or add each completion with ``params.for_completion(i)``."""
        if params.n > 1:
            raise ValueError("SamplingParams.n > 1 needs generate(); with add_request, add one request per completion")
        self._check_params(params)
        return self._add_encoded(self.encode_prompt(prompt, params.max_tokens), params, index)

    def _add_encoded(self, token_ids: list[int], params: SamplingParams, index: int) -> Sequence:
        """Queue a sequence; one with an output constraint waits (outside the scheduler) for its grammar."""
        seq = Sequence(token_ids, params, self.config.kvcache_block_size, index)
        self.admitted_since_step = True
        if params.has_penalties or params.structured:
            self.host_token_seq_ids.add(seq.seq_id)
        if params.structured:
            self.grammars.add(seq)
        else:
            self.scheduler.add(seq)
        return seq

    def _check_grammars(self, params: list[SamplingParams]) -> None:
        """Compile every output constraint (in parallel, each distinct one once); ValueError naming the first
        prompt whose constraint does not compile."""
        futures = [self.grammars.submit(p) for p in params]
        for i, future in enumerate(futures):
            try:
                if future is not None:
                    future.result()
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None

    def check_params(self, params: SamplingParams) -> None:
        """Raise ValueError when ``params`` cannot run on this model: token ids outside its vocabulary, or an
        output constraint that does not compile (compiled here, so a request added later finds it ready)."""
        self._check_params(params)
        future = self.grammars.submit(params)
        if future is not None:
            future.result()

    def _check_params(self, params: SamplingParams) -> None:
        vocab = self.config.hf_config.vocab_size
        for name in ("logit_bias", "stop_token_ids"):
            if any(t >= vocab for t in getattr(params, name)):
                raise ValueError(f"SamplingParams.{name} has token ids outside the vocabulary [0, {vocab})")

    def is_finished(self) -> bool:
        return self.scheduler.is_finished() and self.in_flight is None and not self.grammars.waiting

    def add_step_callback(self, fn: Callable[[StepRecord], None]) -> None:
        """Call ``fn(record)`` after every engine step."""
        self.step_callbacks.append(fn)

    # ----- stepping -------------------------------------------------------------------------------
    def step(self) -> StepOutput:
        """Complete one scheduled batch; return the sequences that finished, the tokens appended and the step's
        metrics.

        With async scheduling, the next batch is scheduled and launched before this one's tokens are read (they
        reach it on the device), so the host work of one step (scheduling, input preparation, postprocessing)
        overlaps the device work of the other instead of leaving the GPU idle. When the next batch has rows whose
        sampling needs this step's tokens on the host, its sampling is queued only after they are postprocessed.
        """
        start = time.perf_counter()
        if self.admitted_since_step:
            self.admitted_since_step = False
            freeze_admitted()
        self._admit_compiled()
        current = self.in_flight or self._launch(self._schedule())
        self.in_flight = self._launch_ahead() if self.async_scheduling else None
        waiting = time.perf_counter()
        token_ids = current.tokens.tolist()
        waited = time.perf_counter() - waiting
        seqs = current.batch.sampling_seqs
        new_tokens = {s.seq_id: t for s, t in zip(seqs, token_ids) if not s.is_finished}  # no list per row: GC churn
        self._record_logprobs(current.tokens, seqs, token_ids)
        finished = self.scheduler.postprocess(seqs, token_ids)
        if self.host_token_seq_ids:  # (only requests with a grammar or a token penalty are in it)
            finished += self._advance_grammars([s for s in seqs if s.seq_id in new_tokens])
        finished += self._apply_stop_strings(seqs)
        now = time.perf_counter()
        for seq in finished:
            seq.finish_time = now
            self.host_token_seq_ids.discard(seq.seq_id)
        self._sample_deferred()
        elapsed = now - start
        self.stats["steps"] += 1
        self.stats[f"{current.batch.phase}_time_s"] += elapsed
        self.stats["generated_tokens"] += len(new_tokens)
        record = self._record(current.batch, len(finished), elapsed, waited)
        for fn in self.step_callbacks:
            fn(record)
        return StepOutput(finished, new_tokens, record)

    def _admit_compiled(self) -> None:
        """Hand requests whose grammar compiled to the scheduler; wait for one when nothing else can run. A
        grammar that does not compile raises ValueError naming its request, which is dropped."""
        wait = self.scheduler.is_finished() and self.in_flight is None
        try:
            for seq in self.grammars.ready(wait):
                self.scheduler.add(seq)
        except GrammarError as e:
            self.host_token_seq_ids.discard(e.seq.seq_id)
            raise ValueError(f"request {e.seq.index} (seq {e.seq.seq_id}): {e}") from None

    def _record_logprobs(self, step: SampledTokens, seqs: list[Sequence], token_ids: list[int]) -> None:
        """Keep the step's logprobs as numpy rows of each sequence (engine/sequence.py); ``result`` builds the
        entries. Rows of sequences that finished while the step was in flight are one past the end: skipped."""
        for seq, first, logprobs in step.prompt_logprobs:
            token, top_ids, top = logprobs.numpy()
            seq.prompt_logprobs.truncate(first - 1)  # positions recomputed after a preemption come again
            seq.prompt_logprobs.add(np.asarray(seq.token_ids[first:first + len(token)]), token, top_ids, top)
        if step.logprobs is None:
            return
        rows, staging = step.logprob_rows, self.logprob_staging
        first = staging.add(np.take(token_ids, rows), *step.logprobs.numpy())
        for i, row in enumerate(rows, first):
            seq = seqs[row]
            if not seq.is_finished:
                seq.logprobs.stage(i, staging)

    def _advance_grammars(self, seqs: list[Sequence]) -> list[Sequence]:
        """Move each constrained sequence's matcher past its new token; finish those whose grammar ended."""
        live = [seq for seq in seqs if seq.grammar is not None and not seq.is_finished]
        tokens = [seq.token_ids[-1] for seq in live]
        accepted = accept_tokens([seq.grammar for seq in live], tokens) if live else []
        finished = []
        for seq, token, ok in zip(live, tokens, accepted):
            # (a matcher ends only by accepting a stop token: no need to ask the others)
            if ok and (token not in self.eos_token_ids or not seq.grammar.is_terminated()):
                continue
            if not seq.grammar.is_terminated():
                logger.warning("seq %d: token %d is outside its grammar; finishing it", seq.seq_id, seq.token_ids[-1])
            self.scheduler.finish(seq, "stop")
            finished.append(seq)
        return finished

    def _schedule(self) -> SchedulerOutput:
        batch = self.scheduler.schedule()
        if not batch.num_rows:
            raise RuntimeError("scheduler made no progress: no waiting sequence fits in the free KV cache "
                               f"({self.scheduler.block_manager.num_free_blocks} free blocks) and none is running")
        return batch

    def _launch(self, batch: SchedulerOutput) -> LaunchedStep:
        runner = self.model_runner
        return LaunchedStep(batch, runner.launch(batch) if self.async_scheduling else runner.run(batch))

    def _launch_ahead(self) -> LaunchedStep | None:
        """Launch the step after the one in flight now, or None when nothing can run before its tokens are read
        (e.g. every running sequence ends with its pending token). When some of its rows need the in-flight
        tokens on the host to be sampled, only its forward pass is queued (:meth:`_sample_deferred`)."""
        batch = self.scheduler.schedule()
        if not batch.num_rows:
            return None
        if self._needs_host_tokens(batch):
            return LaunchedStep(batch, None, self.model_runner.forward(batch))
        return self._launch(batch)

    def _needs_host_tokens(self, batch: SchedulerOutput) -> bool:
        """Whether a row of ``batch`` samples under a grammar or a token penalty (free when no request has one)."""
        ids = self.host_token_seq_ids
        return bool(ids) and any(seq.seq_id in ids for seq in batch.sampling_seqs)

    def _sample_deferred(self) -> None:
        """Queue the sampling of the step in flight if it was launched without it; called once the step before
        it is postprocessed, so its grammar matchers have advanced and its sequences hold every token. (Its rows
        of sequences that finished meanwhile sample a token that is dropped, as any token past a late stop.)"""
        step = self.in_flight
        if step is not None and step.tokens is None:
            step.tokens, step.logits = self.model_runner.sample(step.logits), None

    def _record(self, batch: SchedulerOutput, num_finished: int, elapsed: float, waited: float) -> StepRecord:
        bm, num_tokens = self.scheduler.block_manager, batch.total_num_scheduled_tokens
        return StepRecord(step=self.stats["steps"] - 1, phase=batch.phase, batch_size=batch.num_rows,
                          num_tokens=num_tokens, num_prefill_tokens=num_tokens - batch.num_decode_rows,
                          num_decode_seqs=batch.num_decode_rows, num_running=len(self.scheduler.running),
                          num_waiting=len(self.scheduler.waiting), num_preempted=batch.num_preempted,
                          num_finished=num_finished, kv_blocks_used=bm.num_used_blocks,
                          kv_blocks_free=bm.num_free_blocks, prefix_cache_hit_tokens=batch.num_cached_tokens,
                          step_time_s=elapsed, wait_time_s=waited, timestamp=time.time())

    def _apply_stop_strings(self, seqs: list[Sequence]) -> list[Sequence]:
        finished = []
        for seq in seqs:
            stops = seq.params.stop
            if not stops or seq.is_finished:
                continue
            tail_len = max(len(s) for s in stops) + 4
            tail = self.tokenizer.decode(seq.completion_token_ids[-tail_len:], skip_special_tokens=True)
            if any(s in tail for s in stops):
                text = self.tokenizer.decode(seq.completion_token_ids, skip_special_tokens=True)
                seq.stop_text_end = min(i for i in (text.find(s) for s in stops) if i >= 0)
                self.scheduler.finish(seq, "stop")
                finished.append(seq)
        return finished

    def generate(self, prompts: list[Prompt], sampling_params: SamplingParams | list[SamplingParams] | None = None,
                 use_tqdm: bool = True) -> list[dict]:
        """Complete every prompt; results come back in input order (see README for the fields)."""
        if not isinstance(prompts, list):
            raise ValueError("prompts must be a list (of strings, token-id lists or chat message lists)")
        params = sampling_params if sampling_params is not None else SamplingParams()
        params = params if isinstance(params, list) else [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"got {len(params)} sampling params for {len(prompts)} prompts")
        encoded = []
        for i, (prompt, p) in enumerate(zip(prompts, params)):
            try:
                self._check_params(p)
                encoded.append(self.encode_prompt(prompt, p.max_tokens))
            except ValueError as e:
                raise ValueError(f"prompt {i}: {e}") from None
        self._check_grammars(params)
        # n completions of a prompt are sequences added one after another: the later ones find the prompt's full
        # blocks in the prefix cache
        groups = [[self._add_encoded(ids, p.for_completion(j), i) for j in range(p.n)]
                  for i, (ids, p) in enumerate(zip(encoded, params))]
        seqs = [seq for group in groups for seq in group]
        total_prompt_tokens = sum(s.num_prompt_tokens for s in seqs)
        self.stats["prompt_tokens"] += total_prompt_tokens
        logger.info(RULE)
        logger.info("Starting generation for %d prompts", len(groups))
        logger.info("Total prompt tokens: %d", total_prompt_tokens)
        self._run_until_done(len(seqs), use_tqdm)
        return [self._prompt_result(group) for group in groups]

    def _prompt_result(self, seqs: list[Sequence]) -> dict:
        """One prompt's result: its sequence's, or for n completions each per-completion field as a list of n
        (the prompt's own fields, PROMPT_FIELDS, stay single)."""
        results = [self.result(seq) for seq in seqs]
        if len(results) == 1:
            return results[0]
        return {k: v if k in PROMPT_FIELDS else [r[k] for r in results] for k, v in results[0].items()}

    def _run_until_done(self, num_seqs: int, use_tqdm: bool) -> None:
        before = dict(self.stats)
        bar = tqdm(total=num_seqs, desc="Generating", dynamic_ncols=True) if use_tqdm else None
        done, debug = 0, logger.isEnabledFor(logging.DEBUG)
        while not self.is_finished():
            out = self.step()
            done += len(out.finished)
            if out.finished and debug:
                logger.debug("Postprocess: %d/%d sequences finished", done, num_seqs)
            if bar is not None:
                bar.update(len(out.finished))
                bar.set_postfix(phase=out.record.phase, batch=out.record.batch_size)
        if bar is not None:
            bar.close()
        logger.info("Generation complete: %d steps, total_output_tokens=%d, prefill_time=%.2fs, decode_time=%.2fs",
                    self.stats["steps"] - before["steps"], self.stats["generated_tokens"] - before["generated_tokens"],
                    self.stats["prefill_time_s"] - before["prefill_time_s"],
                    self.stats["decode_time_s"] - before["decode_time_s"])
        logger.info("After generation - %s", memory_summary(self.model_runner.device))
        logger.info(RULE)

    def result(self, seq: Sequence) -> dict:
        """A finished sequence as a result dict (the fields of ``generate``'s results)."""
        text = self.tokenizer.decode(seq.completion_token_ids, skip_special_tokens=True)
        if seq.stop_text_end is not None:
            text = text[:seq.stop_text_end]
        out = dict(text=text, token_ids=seq.completion_token_ids, finish_reason=STOP_REASONS[seq.finish_reason],
                   num_prompt_tokens=seq.num_prompt_tokens, num_cached_tokens=seq.first_cached_tokens or 0,
                   ttft_s=seq.first_token_time - seq.arrival_time, latency_s=seq.finish_time - seq.arrival_time)
        if seq.logprobs is not None:
            out["token_logprobs"], out["logprobs"] = seq.logprobs.lists(self.logprob_staging)
        if seq.prompt_logprobs is not None:
            token_logprobs, alternatives = seq.prompt_logprobs.lists(self.logprob_staging)
            out["prompt_token_logprobs"], out["prompt_logprobs"] = [None] + token_logprobs, [None] + alternatives
        return out

    def shutdown(self) -> None:
        """Release the model runner(s); the engine cannot be used afterwards."""
        if getattr(self, "grammars", None) is not None:
            self.grammars.shutdown()
        if getattr(self, "model_runner", None) is not None:
            self.model_runner.shutdown()
            self.model_runner = None
        gc.unfreeze()  # what this engine's start froze may now be garbage in cycles


class LLM(LLMEngine):
    """``LLM(model, ...)``: a local HF directory, a ``.gguf`` file (or a directory holding one), a hub id, ``"demo"``
    (SmolLM2-135M-Instruct) or ``"demo-random"``; see :class:`engine.config.Config`."""
