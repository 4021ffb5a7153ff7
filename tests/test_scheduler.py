from engine import SamplingParams
from engine.scheduler import Scheduler
from engine.sequence import Sequence, SequenceStatus


class FakeConfig:
    max_num_seqs = 8
    max_num_batched_tokens = 64
    max_model_len = 64
    kvcache_block_size = 16
    enable_prefix_caching = True


def make(n_blocks=4):
    return Scheduler(FakeConfig(), n_blocks, eos_token_ids={0})


def seq(n, first=1, **kw):
    return Sequence(list(range(first, first + n)), SamplingParams(**{"max_tokens": 40, **kw}), 16)


def test_prefill_respects_token_budget_then_decodes():
    sch = make(n_blocks=16)
    a, b, c = seq(30), seq(30, first=100), seq(30, first=200)  # distinct: no prefix-cache hits
    for s in (a, b, c):
        sch.add(s)
    batch, prefill = sch.schedule()
    assert prefill and batch == [a, b]             # 90 tokens exceed the 64-token budget
    sch.postprocess(batch, [5, 5])
    batch, prefill = sch.schedule()
    assert prefill and batch == [c]
    sch.postprocess(batch, [5])
    batch, prefill = sch.schedule()
    assert not prefill and batch == [a, b, c]


def test_preemption_when_blocks_run_out_and_recompute():
    sch = make(n_blocks=4)
    a, b = seq(32), seq(32, first=100)             # 2 full blocks each: the cache is full
    sch.add(a)
    sch.add(b)
    batch, _ = sch.schedule()
    sch.postprocess(batch, [7, 7])                 # both now need a third block
    batch, prefill = sch.schedule()
    assert not prefill and batch == [a]
    assert sch.num_preempted_last_step == 1 and b.status == SequenceStatus.WAITING and not b.block_table
    assert list(sch.waiting) == [b]
    sch.finish(a, "max_tokens")
    batch, prefill = sch.schedule()                # b comes back as a prefill of all 33 tokens
    assert prefill and batch == [b] and len(b) == 33


def test_finish_reasons():
    sch = make(n_blocks=16)
    eos, stop_tok, length = seq(3), seq(3, stop_token_ids=[9]), seq(3, max_tokens=1)
    ignore = seq(3, ignore_eos=True)
    for s in (eos, stop_tok, length, ignore):
        sch.add(s)
    batch, _ = sch.schedule()
    finished = sch.postprocess(batch, [0, 9, 4, 0])
    assert [s.finish_reason for s in finished] == ["eos", "stop", "max_tokens"]
    assert not ignore.is_finished and sch.block_manager.num_used_blocks == 1


def test_max_model_len_stops_sequence():
    sch = make(n_blocks=16)
    s = seq(63)
    sch.add(s)
    batch, _ = sch.schedule()
    assert sch.postprocess(batch, [4]) == [s] and s.finish_reason == "max_model_len"


def test_prefill_budget_counts_only_uncached_tokens():
    sch = make(n_blocks=16)
    first = Sequence(list(range(1, 49)), SamplingParams(max_tokens=4), 16)
    sch.add(first)
    batch, _ = sch.schedule()
    sch.postprocess(batch, [7])
    same = [Sequence(list(range(1, 49)) + [90 + i], SamplingParams(max_tokens=4), 16) for i in range(3)]
    for s in same:
        sch.add(s)
    batch, prefill = sch.schedule()     # 3 x 49 tokens exceed the 64-token budget, but 48 of each are cached
    assert prefill and batch == same and [s.num_cached_tokens for s in same] == [48, 48, 48]
