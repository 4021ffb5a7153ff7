"""Paged KV-cache bookkeeping with prefix caching.

Each full block is keyed by a hash of its token ids chained with the previous block's hash, so equal
hashes mean equal prefixes. Blocks are reference counted; a freed block keeps its hash and contents
until it is reused, so a later request with the same prefix can still hit it (LRU order of freeing).
"""
import logging
from collections import OrderedDict

import numpy as np
import xxhash

from engine.logger import get_logger
from engine.sequence import Sequence

logger = get_logger(__name__)


def block_hash(token_ids: list[int], prefix_hash: int) -> int:
    h = xxhash.xxh64()
    if prefix_hash != -1:
        h.update(prefix_hash.to_bytes(8, "little"))
    h.update(np.asarray(token_ids, dtype=np.int64).tobytes())
    return h.intdigest()


class Block:
    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.hash = -1
        self.token_ids: list[int] = []


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_block_ids: OrderedDict[int, None] = OrderedDict.fromkeys(range(num_blocks))
        self.hash_to_block_id: dict[int, int] = {}

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free_blocks(self) -> int:
        return len(self.free_block_ids)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - self.num_free_blocks

    def _full_block_hashes(self, seq: Sequence) -> list[int]:
        """Chained hashes of the sequence's full blocks, extending the ones computed before (tokens only grow)."""
        hashes = seq.block_hashes
        for i in range(len(hashes), len(seq.token_ids) // self.block_size):
            hashes.append(block_hash(seq.block(i), hashes[-1] if hashes else -1))
        return hashes

    def _cached_prefix(self, seq: Sequence, hashes: list[int]) -> list[int]:
        """Block ids holding the longest cached prefix; the last token is always left to compute."""
        if not self.enable_prefix_caching:
            return []
        hits = []
        for i in range(min(len(hashes), (len(seq) - 1) // self.block_size)):
            block_id = self.hash_to_block_id.get(hashes[i], -1)
            if block_id == -1 or self.blocks[block_id].token_ids != seq.block(i):
                break
            hits.append(block_id)
        return hits

    def can_allocate(self, seq: Sequence) -> tuple[bool, int]:
        """(whether the sequence fits now, how many of its prompt tokens the prefix cache would serve)."""
        hits = self._cached_prefix(seq, self._full_block_hashes(seq))
        hits_in_use = sum(1 for b in hits if self.blocks[b].ref_count > 0)
        return self.num_free_blocks >= seq.num_blocks - hits_in_use, len(hits) * self.block_size

    def allocate(self, seq: Sequence) -> None:
        assert not seq.block_table
        debug = logger.isEnabledFor(logging.DEBUG)
        if debug:
            logger.debug("Allocating blocks for seq_id=%d, num_blocks=%d", seq.seq_id, seq.num_blocks)
        hashes = self._full_block_hashes(seq)
        hits = self._cached_prefix(seq, hashes)
        for block_id in hits:
            self._take(block_id)
        seq.block_table = list(hits)
        for i in range(len(hits), seq.num_blocks):
            block = self._take(next(iter(self.free_block_ids)), fresh=True)
            if i < len(hashes):
                self._register(block, hashes[i], seq.block(i))
            seq.block_table.append(block.block_id)
        seq.num_cached_tokens = len(hits) * self.block_size
        if debug:
            logger.debug("Allocated blocks for seq_id=%d: new=%d, cache_hits=%d, free_blocks=%d, used_blocks=%d",
                         seq.seq_id, seq.num_blocks - len(hits), len(hits), self.num_free_blocks,
                         self.num_used_blocks)

    def deallocate(self, seq: Sequence) -> None:
        freed = 0
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_block_ids[block_id] = None
                freed += 1
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("Deallocated blocks for seq_id=%d: freed=%d/%d, free_blocks=%d",
                         seq.seq_id, freed, len(seq.block_table), self.num_free_blocks)
        seq.block_table = []
        seq.num_cached_tokens = 0

    def can_append(self, seq: Sequence) -> bool:
        """The token at position len(seq)-1 needs a new block when it starts one."""
        return self.num_free_blocks >= (len(seq) % self.block_size == 1)

    def may_append(self, seq: Sequence) -> None:
        position = len(seq) - 1
        if position % self.block_size == 0:
            seq.block_table.append(self._take(next(iter(self.free_block_ids)), fresh=True).block_id)
        elif len(seq) % self.block_size == 0 and self.enable_prefix_caching:
            index = len(seq) // self.block_size - 1
            prefix = self.blocks[seq.block_table[index - 1]].hash if index > 0 else -1
            tokens = seq.block(index)
            if (index == 0 or prefix != -1) and len(tokens) == self.block_size:  # not when a token is pending
                self._register(self.blocks[seq.block_table[index]], block_hash(tokens, prefix), tokens)

    def _take(self, block_id: int, fresh: bool = False) -> Block:
        block = self.blocks[block_id]
        if block.ref_count == 0:
            del self.free_block_ids[block_id]
        if fresh:
            if block.hash != -1 and self.hash_to_block_id.get(block.hash) == block_id:
                del self.hash_to_block_id[block.hash]  # evict the stale prefix entry
            block.hash, block.token_ids = -1, []
        block.ref_count += 1
        return block

    def _register(self, block: Block, h: int, token_ids: list[int]) -> None:
        block.hash, block.token_ids = h, list(token_ids)
        if self.enable_prefix_caching:
            self.hash_to_block_id[h] = block.block_id
