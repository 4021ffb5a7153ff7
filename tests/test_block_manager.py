import numpy as np

from engine.block_manager import BlockManager, block_hash
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BS = 16


def seq(tokens):
    return Sequence(tokens, SamplingParams(), BS)


def test_hash_chains_prefix():
    a, b = list(range(16)), list(range(16, 32))
    assert block_hash(b, block_hash(a, -1)) != block_hash(b, -1)
    assert block_hash(a, -1) == block_hash(list(a), -1)


def test_allocate_hits_refcounts_and_free():
    bm = BlockManager(8, BS)
    s1 = seq(list(range(40)))                      # 3 blocks, 2 full
    bm.allocate(s1)
    assert bm.num_free_blocks == 5 and s1.num_cached_tokens == 0
    s2 = seq(list(range(32)) + [99] * 5)           # shares 2 full blocks
    assert bm.can_allocate(s2) == (True, 32)
    bm.allocate(s2)
    assert s2.block_table[:2] == s1.block_table[:2] and s2.num_cached_tokens == 32
    assert [bm.blocks[b].ref_count for b in s1.block_table] == [2, 2, 1]
    assert bm.num_free_blocks == 4
    bm.deallocate(s1)
    assert [bm.blocks[b].ref_count for b in s2.block_table] == [1, 1, 1] and bm.num_free_blocks == 5
    bm.deallocate(s2)
    assert bm.num_free_blocks == 8


def test_freed_blocks_stay_cached_until_evicted():
    bm = BlockManager(4, BS)
    s1 = seq(list(range(33)))
    bm.allocate(s1)
    bm.deallocate(s1)
    s2 = seq(list(range(33)))
    bm.allocate(s2)                               # hits the two freed full blocks
    assert s2.num_cached_tokens == 32
    bm.deallocate(s2)
    filler = seq([7] * 64)                        # takes every block: old hashes are evicted
    bm.allocate(filler)
    bm.deallocate(filler)
    s3 = seq(list(range(33)))
    bm.allocate(s3)
    assert s3.num_cached_tokens == 0


def test_last_token_always_computed_and_prefix_caching_off():
    bm = BlockManager(8, BS)
    s1 = seq(list(range(32)))
    bm.allocate(s1)
    s2 = seq(list(range(32)))
    bm.allocate(s2)
    assert s2.num_cached_tokens == 16             # the second block holds the last token: recomputed
    off = BlockManager(8, BS, enable_prefix_caching=False)
    off.allocate(seq(list(range(32))))
    s3 = seq(list(range(32)))
    off.allocate(s3)
    assert s3.num_cached_tokens == 0


def test_append_and_decode_block_registration():
    bm = BlockManager(4, BS)
    s = seq(list(range(16)))
    bm.allocate(s)
    assert len(s.block_table) == 1
    s.append_token(100)                           # position 16 starts block 2
    assert bm.can_append(s)
    bm.may_append(s)
    assert len(s.block_table) == 2
    for t in range(101, 116):
        s.append_token(t)
        bm.may_append(s)
    assert len(s) == 32 and len(s.block_table) == 2
    assert bm.blocks[s.block_table[1]].hash != -1  # filled during decode: now shareable
    other = seq(list(range(16)) + list(range(100, 116)) + [5])
    bm.allocate(other)
    assert other.num_cached_tokens == 32


def test_can_allocate_counts_shared_blocks():
    bm = BlockManager(3, BS)
    s1 = seq(list(range(40)))
    bm.allocate(s1)                                # uses all 3 blocks
    assert bm.can_allocate(seq([1] * 5)) == (False, 0)
    s2 = seq(list(range(32)) + [3])                # 2 shared + 1 new block: still no room
    assert bm.can_allocate(s2) == (False, 32)


def test_shared_prefix_blocks_counts_common_leading_entries():
    from engine.model_runner import shared_prefix_blocks
    tables = np.array([[4, 5, 6, 9, 0], [4, 5, 6, 7, 8], [4, 5, 2, 3, 0]], dtype=np.int32)
    assert shared_prefix_blocks(tables, np.array([4, 5, 4])) == 2
    assert shared_prefix_blocks(tables[:2], np.array([4, 5])) == 3
    # a row's last block is never shared (it is still being written), nor is a single row's table
    assert shared_prefix_blocks(tables[:2], np.array([3, 5])) == 2
    assert shared_prefix_blocks(tables[:1], np.array([4])) == 0
    # zero padding past a short row must not count as shared
    padded = np.array([[4, 0, 0], [4, 0, 0]], dtype=np.int32)
    assert shared_prefix_blocks(padded, np.array([1, 1])) == 0
