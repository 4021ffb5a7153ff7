"""The scheduler alone (no model): one token budget per step, chunked prefill, preemption, the running limit,
prefix-cache hits, and the invariants of every SchedulerOutput over randomized runs."""
import random

import pytest

from engine import SamplingParams
from engine.outputs import PENDING_TOKEN, SchedulerOutput
from engine import scheduler
from engine.scheduler import PromptBudget, Scheduler, prompt_tokens_within, prompt_work, prompt_work_cap
from engine.sequence import Sequence, SequenceStatus

BS = 16


class FakeConfig:
    max_num_seqs = 8
    max_num_batched_tokens = 64
    max_prefill_tokens_with_decodes = None
    attention_break_even = float("inf")  # prompt work = prompt tokens, unless a test says otherwise
    max_model_len = 256
    kvcache_block_size = BS
    enable_prefix_caching = True


def make(n_blocks=16, **overrides):
    config = FakeConfig()
    for k, v in overrides.items():
        setattr(config, k, v)
    return Scheduler(config, n_blocks, eos_token_ids={0})


def seq(n, first=1, **kw):
    return Sequence(list(range(first, first + n)), SamplingParams(**{"max_tokens": 40, **kw}), BS)


def rows(out: SchedulerOutput) -> list[tuple[int, int, int, bool]]:
    """(seq_id, start, new tokens, samples) per row."""
    return [(s.seq_id, c, n, smp) for s, c, n, smp in
            zip(out.seqs, out.num_computed_tokens, out.num_scheduled_tokens, out.sample)]


def step(sch, token=5):
    out = sch.schedule()
    sch.postprocess(out.sampling_seqs, [token] * len(out.sampling_seqs))
    return out


def test_one_budget_decodes_first_then_chunks_then_waiting():
    sch = make()
    a, b = seq(30), seq(100, first=100)
    sch.add(a)
    sch.add(b)
    out = step(sch)                                # a whole (30), then b's first chunk (34): 64 tokens
    assert rows(out) == [(a.seq_id, 0, 30, True), (b.seq_id, 0, 34, False)] and out.phase == "prefill"
    assert out.token_ids[1] == b.token_ids[:34] and b.num_pending == 0 and len(a.completion_token_ids) == 1
    c = seq(20, first=300)
    sch.add(c)
    out = step(sch)                                # a's decode, b's next chunk fills the rest; c waits
    assert rows(out) == [(a.seq_id, 30, 1, True), (b.seq_id, 34, 63, False)] and out.num_decode_rows == 1
    out = step(sch)                                # b's last 3 tokens sample; c is admitted whole
    assert rows(out) == [(a.seq_id, 31, 1, True), (b.seq_id, 97, 3, True), (c.seq_id, 0, 20, True)]
    out = step(sch)
    assert out.is_decode_only and out.phase == "decode" and [r[2] for r in rows(out)] == [1, 1, 1]


@pytest.fixture
def flat_cap(monkeypatch):
    """The cap at its face value beside any number of decode rows (these tests have one or two)."""
    monkeypatch.setattr(scheduler, "PROMPT_CAP_ROWS", 1)


def test_prefill_cap_applies_only_beside_decodes(flat_cap):
    sch = make(max_prefill_tokens_with_decodes=16)
    a, b, c = seq(30), seq(100, first=100), seq(20, first=300)
    sch.add(a)
    sch.add(b)
    out = step(sch)                                # no decode rows yet: the whole budget (30 + 34)
    assert rows(out) == [(a.seq_id, 0, 30, True), (b.seq_id, 0, 34, False)]
    sch.add(c)
    out = step(sch)                                # a decodes: b's chunk is capped at 16 tokens, c waits
    assert rows(out) == [(a.seq_id, 30, 1, True), (b.seq_id, 34, 16, False)]
    while b.num_computed_tokens < 100:
        out = step(sch)
        assert out.num_decode_rows and out.total_num_scheduled_tokens - out.num_decode_rows <= 16


@pytest.mark.parametrize("decode_rows,chunk", [(1, 512), (2, 256), (8, 64), (32, 16), (70, 16)])
def test_the_cap_grows_beside_fewer_decode_rows(decode_rows, chunk):
    """Beside fewer than PROMPT_CAP_ROWS decode rows the work cap grows in proportion (16 x 32 / rows), up to the
    token budget; from PROMPT_CAP_ROWS rows on it is the configured 16."""
    assert scheduler.PROMPT_CAP_ROWS == 32
    sch = make(n_blocks=200, max_num_batched_tokens=600, max_num_seqs=80, max_prefill_tokens_with_decodes=16)
    decoding = [seq(3, first=1000 + 4 * i) for i in range(decode_rows)]
    for s in decoding:
        sch.add(s)
    step(sch)                                      # their prompts, whole: no decode rows yet
    sch.add(long := seq(1000, first=5000, max_tokens=1))
    out = step(sch)
    assert out.num_decode_rows == decode_rows and rows(out)[-1] == (long.seq_id, 0, chunk, False)
    assert prompt_work_cap(16, decode_rows) == 16 * max(1, 32 / decode_rows) and prompt_work_cap(16, 0) is None


@pytest.mark.parametrize("break_even", [1.0, 3.5, 40.0, 3840.0, 1e9, float("inf")])
def test_prompt_tokens_within_is_the_largest_chunk_whose_work_fits(break_even):
    for start in (0, 1, 7, 100, 5000, 20000):
        for work in (0, 0.5, 1, 2, 3.7, 10, 64, 1000, 8192):
            n = prompt_tokens_within(work, start, break_even)
            assert prompt_work(start, n, break_even) <= work < prompt_work(start, n + 1, break_even)
    assert prompt_work(10, 4, 2.0) == 4 + (11 + 12 + 13 + 14) / 2  # positions 10..13 attend to 11..14 keys


def test_prompt_budget_floor_and_exhaustion():
    budget = PromptBudget(tokens=100, work=3.0, break_even=10.0)
    assert not budget.exhausted and budget.chunk(50, 20) == 1   # a token at 50 costs 6.1: the first row's floor
    budget.spend(50, 1, 20)                                     # cut short: no other prompt row this step
    assert budget.exhausted and budget.tokens == 0 and budget.chunk(0, 5) == 0
    budget = PromptBudget(tokens=100, work=3.0, break_even=10.0)
    budget.spend(0, 2, 2)                                       # 2 + 0.3 of work: 0.7 left, less than any token
    assert budget.exhausted and budget.tokens == 98
    assert not PromptBudget(tokens=5, work=None, break_even=10.0).exhausted


def test_long_context_chunks_beside_decodes_are_cut_by_their_attention(flat_cap):
    sch = make(max_num_batched_tokens=200, max_model_len=1024, n_blocks=80, max_prefill_tokens_with_decodes=32,
               attention_break_even=64.0)
    a, b, c = seq(10, max_tokens=200), seq(400, first=100), seq(10, first=600)
    sch.add(a)
    sch.add(b)
    out = step(sch)                                # no decode rows yet: tokens only (10 + 190)
    assert rows(out) == [(a.seq_id, 0, 10, True), (b.seq_id, 0, 190, False)]
    sch.add(c)
    out = step(sch)              # b from 190: each token counts ~4 (1 + ~190 / 64), so 32 of work buy 7 tokens
    assert rows(out) == [(a.seq_id, 10, 1, True), (b.seq_id, 190, 7, False)]  # and c waits behind the cut chunk
    assert prompt_work(190, 7, 64.0) <= 32 < prompt_work(190, 8, 64.0)
    while b.num_computed_tokens < 400:             # every step stays within the work cap
        out = step(sch)
        prompt = list(zip(out.num_computed_tokens, out.num_scheduled_tokens))[out.num_decode_rows:]
        assert out.num_decode_rows and sum(prompt_work(start, n, 64.0) for start, n in prompt) <= 32
    step(sch)                                      # c, short and from position 0, is done within a step
    assert c.completion_token_ids


def test_a_prompt_deep_in_a_long_context_still_advances_one_token_a_step(flat_cap):
    sch = make(max_num_batched_tokens=200, max_model_len=1024, n_blocks=80, max_prefill_tokens_with_decodes=2,
               attention_break_even=1.0)
    a, b = seq(10), seq(300, first=100)
    sch.add(a)
    sch.add(b)
    step(sch)
    for start in range(190, 195):                  # one token costs ~190 of work, the cap is 2: still one
        out = step(sch)
        assert rows(out)[1] == (b.seq_id, start, 1, False)


def test_prompt_longer_than_budget_completes_in_chunks():
    sch = make(max_num_batched_tokens=32)
    s = seq(200)
    sch.add(s)
    starts = []
    while not s.completion_token_ids:
        out = step(sch)
        starts.append(out.num_computed_tokens[0])
        assert out.total_num_scheduled_tokens <= 32 and out.sample == [s.num_computed_tokens == 200]
    assert starts == list(range(0, 200, 32)) and len(s.block_table) == 13


def test_preemption_when_blocks_run_out_and_recompute():
    sch = make(n_blocks=4)
    a, b = seq(32), seq(32, first=100)             # 2 full blocks each: the cache is full
    sch.add(a)
    sch.add(b)
    step(sch, token=7)                             # both now need a third block
    out = step(sch)
    assert rows(out) == [(a.seq_id, 32, 1, True)]
    assert out.num_preempted == 1 and b.status == SequenceStatus.WAITING and not b.block_table
    assert list(sch.waiting) == [b] and b.num_computed_tokens == 0
    sch.finish(a, "max_tokens")
    out = sch.schedule()   # b comes back: its first block is still cached (a's new block evicted the second one)
    assert rows(out) == [(b.seq_id, 16, 17, True)] and out.num_cached_tokens == 16 and len(b) == 34


def test_preempts_the_newest_sequence_not_in_the_batch():
    sch = make(n_blocks=6, max_num_batched_tokens=200)
    old, mid, new = seq(48), seq(16, first=100), seq(16, first=200)  # 3 + 1 + 1 full blocks, 1 free
    for s in (old, mid, new):
        sch.add(s)
    step(sch)
    out = step(sch)            # old's and mid's next tokens need 2 blocks: new (the newest) is preempted
    assert rows(out) == [(old.seq_id, 48, 1, True), (mid.seq_id, 16, 1, True)]
    assert new.status == SequenceStatus.WAITING and out.num_preempted == 1
    assert list(sch.waiting) == [new]          # not re-admitted in the step that preempted it
    sch.finish(old, "stop")
    out = sch.schedule()
    assert rows(out) == [(mid.seq_id, 17, 1, True), (new.seq_id, 0, 17, True)] and out.num_cached_tokens == 0


def fill_cache(sch, leave_free: int) -> Sequence:
    """A sequence holding every free KV block but ``leave_free`` (stands in for other running work)."""
    filler = seq(16, first=1000)
    assert sch.block_manager.allocate(filler, BS * (sch.block_manager.num_free_blocks - leave_free))
    return filler


def test_waiting_prompts_leave_the_watermark_to_decodes():
    sch = make(n_blocks=300)
    assert sch.watermark == 3                      # 1 % of the blocks
    a = seq(64)
    sch.add(a)
    step(sch)                                      # 4 full blocks: a's next token needs a fifth
    filler = fill_cache(sch, leave_free=5)
    b = seq(32, first=500)
    sch.add(b)
    out = step(sch)                                # b's 2 blocks would leave 2 of the 4 free: below the watermark
    assert rows(out) == [(a.seq_id, 64, 1, True)] and b.status == SequenceStatus.WAITING
    assert sch.block_manager.num_free_blocks == 4 and not out.num_preempted
    sch.block_manager.free(filler)
    out = step(sch)
    assert [r[0] for r in rows(out)] == [a.seq_id, b.seq_id]


def test_prompt_chunk_waits_instead_of_preempting_decodes():
    sch = make(n_blocks=300)
    a, c = seq(16), seq(200, first=600)
    sch.add(a)
    step(sch)
    sch.add(c)
    out = step(sch)                                # a's decode, then c's first chunk
    assert rows(out) == [(a.seq_id, 16, 1, True), (c.seq_id, 0, 63, False)]
    filler = fill_cache(sch, leave_free=3)
    out = step(sch)                                # c's next chunk needs 4 blocks: it waits, a decodes
    assert rows(out) == [(a.seq_id, 17, 1, True)] and not out.num_preempted
    assert c.status == SequenceStatus.RUNNING and c.num_computed_tokens == 63
    sch.block_manager.free(filler)
    out = step(sch)
    assert rows(out) == [(a.seq_id, 18, 1, True), (c.seq_id, 63, 63, False)]


def test_running_limit_bounds_the_running_set():
    sch = make(max_num_seqs=2)
    seqs = [seq(5, first=10 * i + 1) for i in range(4)]
    for s in seqs:
        sch.add(s)
    out = step(sch)
    assert [r[0] for r in rows(out)] == [seqs[0].seq_id, seqs[1].seq_id] and len(sch.running) == 2
    sch.finish(seqs[0], "stop")
    out = step(sch)                                # one place freed: one more admitted next to the decode
    assert [r[0] for r in rows(out)] == [seqs[1].seq_id, seqs[2].seq_id] and len(sch.running) == 2


def test_finish_reasons():
    sch = make()
    eos, stop_tok, length = seq(3), seq(3, stop_token_ids=[9]), seq(3, max_tokens=1)
    ignore, eos_listed = seq(3, ignore_eos=True), seq(3, ignore_eos=True, stop_token_ids=[0])
    for s in (eos, stop_tok, length, ignore, eos_listed):
        sch.add(s)
    out = sch.schedule()
    finished = sch.postprocess(out.sampling_seqs, [0, 9, 4, 0, 0])
    assert [s.finish_reason for s in finished] == ["eos", "stop", "max_tokens", "stop"]
    assert not ignore.is_finished and sch.block_manager.num_used_blocks == 1


def test_max_model_len_stops_sequence():
    sch = make(max_model_len=64)
    s = seq(63)
    sch.add(s)
    out = sch.schedule()
    assert sch.postprocess(out.sampling_seqs, [4]) == [s] and s.finish_reason == "max_model_len"


def test_prefill_budget_counts_only_uncached_tokens():
    sch = make()
    first = Sequence(list(range(1, 49)), SamplingParams(max_tokens=4), BS)
    sch.add(first)
    step(sch, token=7)
    same = [Sequence(list(range(1, 49)) + [90 + i], SamplingParams(max_tokens=4), BS) for i in range(3)]
    for s in same:
        sch.add(s)
    out = sch.schedule()         # 3 x 49 tokens exceed the 64-token budget, but 48 of each are cached
    assert [r[0] for r in rows(out)] == [first.seq_id] + [s.seq_id for s in same]
    assert [s.num_cached_tokens for s in same] == [48, 48, 48] and out.num_cached_tokens == 144


def test_hits_on_blocks_computed_in_the_same_step():
    """A prompt hits blocks that an earlier row of the same step computes (every layer stores the batch's K/V
    before attending), never blocks of chunks not scheduled yet."""
    sch = make(max_num_batched_tokens=40)
    a, b = seq(100), seq(100)
    sch.add(a)
    sch.add(b)
    assert rows(sch.schedule()) == [(a.seq_id, 0, 40, False)]   # b: no budget left
    assert len(sch.block_manager.hash_to_block_id) == 2          # a's 2 computed full blocks, not all 6
    assert rows(sch.schedule()) == [(a.seq_id, 40, 40, False)]
    out = sch.schedule()   # a's last chunk computes block 5 (tokens 80-95) in this step: b hits all 6 blocks
    assert rows(out) == [(a.seq_id, 80, 20, True), (b.seq_id, 96, 4, True)] and out.num_cached_tokens == 96
    assert b.block_table[:6] == a.block_table[:6]


def test_cached_prefix_found_when_a_chunked_prompt_is_first_scheduled():
    sch = make(max_num_batched_tokens=32)
    a = seq(50)
    sch.add(a)
    while not a.is_finished:
        step(sch, token=0)                                       # EOS after its prompt
    b = Sequence(list(range(1, 51)) + list(range(300, 400)), SamplingParams(max_tokens=4), BS)
    sch.add(b)
    out = step(sch)        # 3 cached blocks: the first chunk starts at 48, mid-way through a's last block
    assert rows(out) == [(b.seq_id, 48, 32, False)] and b.num_cached_tokens == 48
    assert rows(step(sch)) == [(b.seq_id, 80, 32, False)]


def check_batch(sch: Scheduler, out: SchedulerOutput, was_waiting: set[int], pending: set[int],
                ends: dict[int, int], writes: dict) -> None:
    """Invariants of one SchedulerOutput. ``ends`` carries each sequence's computed tokens between steps;
    ``writes`` maps each KV slot (block, offset) to the (sequence, position) whose K/V a step wrote there."""
    assert out.total_num_scheduled_tokens <= sch.max_num_batched_tokens
    assert len(sch.running) <= sch.max_num_seqs and out.num_rows <= sch.max_num_seqs
    assert len({s.seq_id for s in out.seqs}) == out.num_rows and all(out.sample[:-1])  # a short chunk is last
    for i, (s, start, n, sample) in enumerate(zip(out.seqs, out.num_computed_tokens, out.num_scheduled_tokens,
                                                  out.sample)):
        assert n >= 1 and s.status == SequenceStatus.RUNNING
        if s.seq_id in was_waiting:                    # admitted: starts after its prefix-cache hits
            assert start == s.num_cached_tokens and start % BS == 0
        else:                                          # running: continues where its last row ended
            assert start == ends[s.seq_id]
        ends[s.seq_id] = start + n
        len_before = len(s) - sample                   # a sampling row added a pending token
        assert start + n <= len_before and sample == (start + n == len_before)
        decoding = start == len_before - 1 >= s.num_prompt_tokens and s.seq_id not in was_waiting
        assert decoding == (i < out.num_decode_rows)
        expected = s.token_ids[start:start + n]
        if s.seq_id in pending and decoding:
            expected = expected + [PENDING_TOKEN]
        assert list(out.token_ids[i]) == expected
        assert len(s.block_table) == -(-(start + n) // BS) and out.block_tables[i] is s.block_table
        for pos in range(start, start + n):
            writes[s.block_table[pos // BS], pos % BS] = s, pos
    prompt_rows = list(zip(out.num_computed_tokens, out.num_scheduled_tokens))[out.num_decode_rows:]
    one_token_floor = [n for _, n in prompt_rows] == [1]
    cap = prompt_work_cap(sch.max_prefill_tokens_with_decodes, out.num_decode_rows)
    if cap is not None and not one_token_floor:
        assert sum(prompt_work(start, n, sch.attention_break_even) for start, n in prompt_rows) <= cap
    for s, start in zip(out.seqs, out.num_computed_tokens):
        for pos in range(start if s.seq_id in was_waiting else 0):  # prefix-cache hits hold this prompt's K/V
            writer, writer_pos = writes[s.block_table[pos // BS], pos % BS]
            assert writer.token_ids[:writer_pos + 1] == s.token_ids[:pos + 1]


SMALL_CACHE = 16  # blocks; at most this, the runs below preempt


@pytest.mark.parametrize("async_scheduling", [False, True])
@pytest.mark.parametrize("seed,budget,n_blocks,max_num_seqs,work_cap", [
    (0, 16, 13, 8, None), (1, 32, 11, 16, None), (2, 48, 12, 4, None), (3, 100, 14, 16, None), (4, 32, 64, 3, None),
    (5, 64, 64, 1, None), (6, 64, 64, 8, 40), (7, 100, 14, 16, 12)])
def test_randomized_runs_keep_every_invariant(seed, budget, n_blocks, max_num_seqs, work_cap, async_scheduling):
    rng = random.Random(seed)
    sch = make(n_blocks=n_blocks, max_num_batched_tokens=budget, max_num_seqs=max_num_seqs, max_model_len=160,
               max_prefill_tokens_with_decodes=work_cap, attention_break_even=30.0)
    shared = [rng.randrange(1, 50) for _ in range(48)]
    seqs = []
    for _ in range(24):
        prompt = shared[:rng.choice([0, 16, 40, 48])] + [rng.randrange(1, 50) for _ in range(rng.randrange(1, 110))]
        seqs.append(Sequence(prompt[:150], SamplingParams(max_tokens=rng.randrange(1, 12)), BS))
    ends, writes, in_flight, arrivals, steps, hits, preempted = {}, {}, None, list(seqs), 0, 0, 0
    while arrivals or not sch.is_finished() or in_flight:
        for _ in range(min(len(arrivals), rng.randrange(sch.is_finished() and not in_flight, 3))):
            sch.add(arrivals.pop(0))
        current = in_flight
        if current is None:
            current = scheduled(sch, ends, writes)
            assert current.num_rows, "no progress"
        in_flight = scheduled(sch, ends, writes) if async_scheduling else None
        if in_flight is not None and not in_flight.num_rows:
            in_flight = None
        tokens = [rng.randrange(0, 50) for _ in current.sampling_seqs]  # token 0 is EOS
        sch.postprocess(current.sampling_seqs, tokens)
        steps, hits, preempted = steps + 1, hits + current.num_cached_tokens, preempted + current.num_preempted
    assert all(s.is_finished for s in seqs) and sch.block_manager.num_used_blocks == 0
    assert steps > 20 and hits > 0 and (preempted > 0) == (n_blocks <= SMALL_CACHE)


def scheduled(sch: Scheduler, ends: dict[int, int], writes: dict) -> SchedulerOutput:
    was_waiting = {s.seq_id for s in sch.waiting}
    pending = {s.seq_id for s in sch.running if s.num_pending}
    out = sch.schedule()
    check_batch(sch, out, was_waiting, pending, ends, writes)
    return out
