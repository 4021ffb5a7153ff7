"""Paged KV-cache bookkeeping with prefix caching.

Each full block is keyed by a hash of its token ids chained with the previous block's hash, so equal
hashes mean equal prefixes. Blocks are reference counted; a freed block keeps its hash and contents
until it is reused, so a later request with the same prefix can still hit it (LRU order of freeing).

A block enters the hash index only once every one of its tokens is known on the host and scheduled for
computation (:meth:`BlockManager.register_computed_blocks`). A later step may then read it: steps run in
launch order. So may a later row of the same step: every layer stores the whole batch's K/V before it
attends, so the block's K/V are written, in each layer, before any row reads them there.
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

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[int]:
        """Chained hashes of the sequence's first ``num_blocks`` full blocks, extending the ones computed
        before (tokens only grow)."""
        hashes = seq.block_hashes
        for i in range(len(hashes), num_blocks):
            hashes.append(block_hash(seq.block(i), hashes[-1] if hashes else -1))
        return hashes

    def cached_prefix(self, seq: Sequence) -> list[int]:
        """Block ids holding the longest cached prefix of a sequence with no blocks yet; its last token is
        always left to compute (its logits sample the next one)."""
        if not self.enable_prefix_caching:
            return []
        num_blocks = (len(seq) - 1) // self.block_size
        hits = []
        for i, h in enumerate(self._block_hashes(seq, num_blocks)[:num_blocks]):
            block_id = self.hash_to_block_id.get(h, -1)
            if block_id == -1 or self.blocks[block_id].token_ids != seq.block(i):
                break
            hits.append(block_id)
        return hits

    def allocate(self, seq: Sequence, num_tokens: int, cached: list[int] | None = None, reserve: int = 0) -> bool:
        """Extend the sequence's block table to hold its first ``num_tokens`` tokens, starting with the
        ``cached`` prefix blocks on its first allocation. False, changing nothing, when that would leave fewer
        than ``reserve`` blocks free."""
        if not cached and num_tokens <= len(seq.block_table) * self.block_size:
            return True  # the common decode step: the last block has room
        cached = cached or []
        num_new = max(0, -(-num_tokens // self.block_size) - len(seq.block_table) - len(cached))
        num_revived = sum(1 for b in cached if self.blocks[b].ref_count == 0)  # free, but holding a cached prefix
        if num_new + num_revived > self.num_free_blocks - reserve:
            return False
        debug = logger.isEnabledFor(logging.DEBUG)
        if debug:
            logger.debug("Allocating blocks for seq_id=%d, num_blocks=%d", seq.seq_id,
                         len(seq.block_table) + len(cached) + num_new)
        for block_id in cached:
            self._take(block_id)
        seq.block_table.extend(cached)
        seq.num_registered_blocks += len(cached)
        for _ in range(num_new):
            seq.block_table.append(self._take(next(iter(self.free_block_ids)), fresh=True).block_id)
        if debug:
            logger.debug("Allocated blocks for seq_id=%d: new=%d, cache_hits=%d, free_blocks=%d, used_blocks=%d",
                         seq.seq_id, num_new, len(cached), self.num_free_blocks, self.num_used_blocks)
        return True

    def register_computed_blocks(self, seq: Sequence) -> None:
        """Add the sequence's full blocks whose tokens are all scheduled and known to the prefix cache (a block
        whose last token is still being sampled joins one step later)."""
        num_full = min(seq.num_computed_tokens, len(seq.token_ids)) // self.block_size
        if num_full <= seq.num_registered_blocks or not self.enable_prefix_caching:
            return
        hashes = self._block_hashes(seq, num_full)
        for i in range(seq.num_registered_blocks, num_full):
            block = self.blocks[seq.block_table[i]]
            block.hash, block.token_ids = hashes[i], seq.block(i)
            self.hash_to_block_id[hashes[i]] = block.block_id
        seq.num_registered_blocks = num_full

    def free(self, seq: Sequence) -> None:
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
        seq.num_registered_blocks = 0

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
