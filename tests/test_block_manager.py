import numpy as np

from engine.block_manager import BlockManager, block_hash
from engine.sampling_params import SamplingParams
from engine.sequence import Sequence

BS = 16


def seq(tokens):
    return Sequence(tokens, SamplingParams(), BS)


def admit(bm, s, num_computed=None):
    """Allocate a whole new sequence (taking its cached prefix) and mark ``num_computed`` tokens computed."""
    cached = bm.cached_prefix(s)
    assert bm.allocate(s, len(s), cached)
    s.num_cached_tokens = len(cached) * BS
    s.num_computed_tokens = len(s) if num_computed is None else num_computed
    bm.register_computed_blocks(s)
    return s


def test_hash_chains_prefix():
    a, b = list(range(16)), list(range(16, 32))
    assert block_hash(b, block_hash(a, -1)) != block_hash(b, -1)
    assert block_hash(a, -1) == block_hash(list(a), -1)


def test_allocate_hits_refcounts_and_free():
    bm = BlockManager(8, BS)
    s1 = admit(bm, seq(list(range(40))))           # 3 blocks, 2 full
    assert bm.num_free_blocks == 5 and s1.num_cached_tokens == 0
    s2 = seq(list(range(32)) + [99] * 5)           # shares 2 full blocks
    assert len(bm.cached_prefix(s2)) == 2
    admit(bm, s2)
    assert s2.block_table[:2] == s1.block_table[:2] and s2.num_cached_tokens == 32
    assert [bm.blocks[b].ref_count for b in s1.block_table] == [2, 2, 1]
    assert bm.num_free_blocks == 4
    bm.free(s1)
    assert [bm.blocks[b].ref_count for b in s2.block_table] == [1, 1, 1] and bm.num_free_blocks == 5
    bm.free(s2)
    assert bm.num_free_blocks == 8


def test_freed_blocks_stay_cached_until_evicted():
    bm = BlockManager(4, BS)
    bm.free(admit(bm, seq(list(range(33)))))
    s2 = admit(bm, seq(list(range(33))))           # hits the two freed full blocks
    assert s2.num_cached_tokens == 32
    bm.free(s2)
    bm.free(admit(bm, seq([7] * 64)))              # takes every block: old hashes are evicted
    assert admit(bm, seq(list(range(33)))).num_cached_tokens == 0


def test_last_token_always_computed_and_prefix_caching_off():
    bm = BlockManager(8, BS)
    admit(bm, seq(list(range(32))))
    assert admit(bm, seq(list(range(32)))).num_cached_tokens == 16  # the second block holds the last token
    off = BlockManager(8, BS, enable_prefix_caching=False)
    admit(off, seq(list(range(32))))
    assert admit(off, seq(list(range(32)))).num_cached_tokens == 0 and not off.hash_to_block_id


def test_only_computed_blocks_are_cached():
    """A block joins the prefix cache once its tokens are scheduled for computation, not at allocation."""
    bm = BlockManager(8, BS)
    first = admit(bm, seq(list(range(50))), num_computed=20)  # a first chunk: block 0 full, block 1 partial
    assert len(bm.hash_to_block_id) == 1
    assert admit(bm, seq(list(range(50)))).num_cached_tokens == 16
    first.num_computed_tokens = 48                 # the next chunk completes blocks 1 and 2
    bm.register_computed_blocks(first)
    assert first.num_registered_blocks == 3
    assert admit(bm, seq(list(range(50)))).num_cached_tokens == 48


def test_block_completed_by_a_pending_token_is_cached_once_known():
    bm = BlockManager(4, BS)
    s = admit(bm, seq(list(range(15))))           # 15 tokens computed, one sampled token in flight
    s.num_pending = 1
    assert bm.allocate(s, 16)
    s.num_computed_tokens = 16                     # a decode step fed the pending token (position 15)
    bm.register_computed_blocks(s)
    assert not bm.hash_to_block_id                 # its value is not known yet
    s.append_token(100)
    assert bm.allocate(s, 17) and len(s.block_table) == 2
    s.num_computed_tokens = 17
    bm.register_computed_blocks(s)
    assert bm.blocks[s.block_table[0]].hash == block_hash(list(range(15)) + [100], -1)
    assert admit(bm, seq(list(range(15)) + [100, 5])).num_cached_tokens == 16


def test_allocate_fails_without_change_and_counts_revived_blocks():
    bm = BlockManager(3, BS)
    s1 = admit(bm, seq(list(range(40))))           # uses all 3 blocks
    s2 = seq([1] * 5)
    assert not bm.allocate(s2, 5) and not s2.block_table and bm.num_free_blocks == 0
    bm.free(s1)
    s3 = seq(list(range(32)) + [3] * 20)           # 2 cached (free, so revived) + 2 new blocks > 3 free
    cached = bm.cached_prefix(s3)
    assert len(cached) == 2 and not bm.allocate(s3, 52, cached) and not s3.block_table
    assert bm.allocate(s3, 48, cached) and bm.num_free_blocks == 0


def test_longest_first_orders_decode_rows_by_context_length():
    from engine.model_runner import longest_first
    assert longest_first(np.array([5, 900, 17, 900, 0])).tolist() == [1, 3, 2, 0, 4]  # ties keep their order
    assert longest_first(np.array([], dtype=np.int64)).tolist() == []


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


def test_block_table_array_pads_rows():
    from engine.model_runner import block_table_array
    table, lengths = block_table_array([[3], [5, 6, 7], [8, 9]])
    assert table.tolist() == [[3, 0, 0], [5, 6, 7], [8, 9, 0]] and lengths.tolist() == [1, 3, 2]
