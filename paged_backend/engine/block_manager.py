"""The KV block pool: ref counts, an O(1) free list and the prefix cache.

Pure Python. A block holds `block_size` consecutive tokens of one or more
sequences. Full blocks are named by a chained hash (the parent block's hash
and the block's tokens), so two requests with the same prefix reach the same
blocks. A block whose ref count drops to zero keeps its hash and goes to the
end of the free list: it can still be hit until it is reused (lazy eviction,
least recently freed first).

Parallel sampling forks a request: the child's block table points at the
parent's blocks (ref counts go up, nothing is copied). A request about to
write into a block it shares (only ever the last, partly filled one) gets a
private copy first: copy-on-write. The copies to make are handed to the
runner with the step's schedule (`take_copies`).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional, Sequence

from paged_backend.engine.request import Request


@dataclass(slots=True)
class Block:
    """One physical KV block."""

    block_id: int
    ref_cnt: int = 0
    block_hash: Optional[int] = None


@dataclass(slots=True)
class BlockStats:
    """Counters for `LLMEngine.get_stats()`."""

    peak_used: int = 0
    prefix_cache_queries: int = 0  # prompt tokens looked up
    prefix_cache_hit_tokens: int = 0
    evictions: int = 0
    cow_copies: int = 0
    extra: dict = field(default_factory=dict)


def hash_block(parent_hash: Optional[int], tokens: Sequence[int]) -> int:
    """Chained hash of one full block: depends on every token before it too."""
    return hash((parent_hash, tuple(tokens)))


class BlockManager:
    """Allocates KV blocks to requests, with prefix caching.

    `allocate_slots` gives a request room for new tokens (or says no: the
    scheduler then preempts); `cache_blocks` names the request's blocks that
    have become full and computed; `free` returns a request's blocks.
    """

    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(f"need num_blocks >= 1 and block_size >= 1, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.blocks = [Block(i) for i in range(num_blocks)]
        # Blocks with ref_cnt == 0, least recently freed first; O(1) append, pop and removal.
        self._free: OrderedDict[int, None] = OrderedDict((i, None) for i in range(num_blocks))
        self._cached: dict[int, int] = {}  # block hash -> block id
        self._req_blocks: dict[str, list[int]] = {}
        self._num_cached_blocks: dict[str, int] = {}  # how many leading blocks carry a hash
        self._copies: list[tuple[int, int]] = []  # (src, dst) block copies not yet handed out
        self.stats = BlockStats()

    # ----------------------------------------------------------------- queries
    @property
    def num_free_blocks(self) -> int:
        return len(self._free)

    @property
    def num_used_blocks(self) -> int:
        return self.num_blocks - len(self._free)

    @property
    def num_cached_blocks(self) -> int:
        return len(self._cached)

    def block_ids(self, request_id: str) -> list[int]:
        """The block table of a request (the live list: do not mutate)."""
        return self._req_blocks.get(request_id, [])

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ------------------------------------------------------------ prefix cache
    def _update_hashes(self, request: Request, num_tokens: int) -> None:
        """Extend `request.block_hashes` over the full blocks of its first num_tokens tokens."""
        bs = self.block_size
        hashes = request.block_hashes
        for b in range(len(hashes), num_tokens // bs):
            parent = hashes[-1] if hashes else None
            hashes.append(hash_block(parent, request.token_slice(b * bs, (b + 1) * bs)))

    def get_computed_blocks(self, request: Request) -> tuple[list[int], int]:
        """Longest cached prefix of the request's tokens: (block ids, number of tokens).

        At least one token is always left to compute, so the step that
        finishes the prompt produces logits to sample from.
        """
        if not (self.enable_prefix_caching and request.use_prefix_cache):
            return [], 0
        n = request.num_tokens
        self._update_hashes(request, n)
        max_blocks = (n - 1) // self.block_size
        hits: list[int] = []
        for h in request.block_hashes[:max_blocks]:
            bid = self._cached.get(h)
            if bid is None:
                break
            hits.append(bid)
        num_hit = len(hits) * self.block_size
        self.stats.prefix_cache_queries += n
        return hits, num_hit

    # -------------------------------------------------------------- allocation
    def _pop_free(self) -> int:
        bid, _ = self._free.popitem(last=False)
        blk = self.blocks[bid]
        if blk.block_hash is not None:  # evict lazily: the hash goes only now
            if self._cached.get(blk.block_hash) == bid:
                del self._cached[blk.block_hash]
            blk.block_hash = None
            self.stats.evictions += 1
        blk.ref_cnt = 1
        return bid

    def _touch(self, bid: int) -> None:
        blk = self.blocks[bid]
        if blk.ref_cnt == 0:
            del self._free[bid]
        blk.ref_cnt += 1

    def can_allocate(self, request: Request, num_new_tokens: int,
                     computed_blocks: Sequence[int] = ()) -> bool:
        """Whether `allocate_slots` would succeed (changes nothing)."""
        table = self._req_blocks.get(request.request_id, ())
        have = len(table) + len(computed_blocks)
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        need = max(0, self.blocks_needed(num_computed + num_new_tokens) - have)
        revived = sum(1 for b in computed_blocks if self.blocks[b].ref_cnt == 0)
        shared = len(self._shared_written(table, num_computed, num_new_tokens))
        return need + revived + shared <= len(self._free)

    def _shared_written(self, table: Sequence[int], num_computed: int,
                        num_new_tokens: int) -> list[int]:
        """Indices into `table` of blocks that tokens [num_computed, +num_new) write and others hold."""
        if num_new_tokens <= 0 or not table:
            return []
        first = num_computed // self.block_size
        last = min((num_computed + num_new_tokens - 1) // self.block_size, len(table) - 1)
        return [i for i in range(first, last + 1) if self.blocks[table[i]].ref_cnt > 1]

    def allocate_slots(self, request: Request, num_new_tokens: int,
                       computed_blocks: Sequence[int] = ()) -> bool:
        """Give the request blocks for `num_new_tokens` more tokens.

        `computed_blocks` (from `get_computed_blocks`, for a request not yet
        holding blocks) are shared, not copied. Returns False, changing
        nothing, when the free list is too short.
        """
        if not computed_blocks and num_new_tokens == 1:
            # Decode fast path: the token's slot is in a block this request owns alone.
            table = self._req_blocks.get(request.request_id)
            i = request.num_computed_tokens // self.block_size
            if table and i < len(table) and self.blocks[table[i]].ref_cnt == 1:
                return True
        if not self.can_allocate(request, num_new_tokens, computed_blocks):
            return False
        table = self._req_blocks.setdefault(request.request_id, [])
        if computed_blocks:
            assert not table or len(table) * self.block_size <= request.num_computed_tokens
            for bid in computed_blocks:
                self._touch(bid)
            table.extend(computed_blocks)
            self._num_cached_blocks[request.request_id] = len(table)
            self.stats.prefix_cache_hit_tokens += len(computed_blocks) * self.block_size
        num_computed = request.num_computed_tokens + len(computed_blocks) * self.block_size
        for i in self._shared_written(table, num_computed, num_new_tokens):
            # Copy-on-write: this request gets its own copy of a block it shares.
            src = table[i]
            dst = self._pop_free()
            self.blocks[src].ref_cnt -= 1
            table[i] = dst
            self._copies.append((src, dst))
            self.stats.cow_copies += 1
        for _ in range(self.blocks_needed(num_computed + num_new_tokens) - len(table)):
            table.append(self._pop_free())
        self.stats.peak_used = max(self.stats.peak_used, self.num_used_blocks)
        return True

    def cache_blocks(self, request: Request, num_computed_tokens: int) -> None:
        """Name (hash) the request's blocks that are full and computed, so others can hit them."""
        if not (self.enable_prefix_caching and request.use_prefix_cache):
            return
        rid = request.request_id
        table = self._req_blocks.get(rid)
        if not table:
            return
        num_full = min(num_computed_tokens // self.block_size, len(table))
        start = self._num_cached_blocks.get(rid, 0)
        if num_full <= start:
            return
        self._update_hashes(request, num_full * self.block_size)
        for i in range(start, num_full):
            blk = self.blocks[table[i]]
            h = request.block_hashes[i]
            if blk.block_hash is None:
                blk.block_hash = h
                self._cached.setdefault(h, blk.block_id)
        self._num_cached_blocks[rid] = num_full

    def free(self, request: Request) -> None:
        """Drop the request's references; blocks no one holds go to the free list.

        The tail is freed first, so it is evicted before the shared prefix.
        """
        table = self._req_blocks.pop(request.request_id, None)
        self._num_cached_blocks.pop(request.request_id, None)
        if not table:
            return
        freed = set()
        for bid in reversed(table):
            blk = self.blocks[bid]
            blk.ref_cnt -= 1
            assert blk.ref_cnt >= 0, f"block {bid} freed more often than taken"
            if blk.ref_cnt == 0:
                self._free[bid] = None
                freed.add(bid)
        if self._copies and freed:  # a copy into a block nobody holds any more is moot
            self._copies = [(a, b) for a, b in self._copies if b not in freed]

    def fork(self, parent: Request, child: Request) -> None:
        """Give `child` the parent's blocks, shared (ref counts + 1), not copied."""
        if child.request_id in self._req_blocks:
            raise ValueError(f"request {child.request_id!r} already holds blocks")
        table = self._req_blocks.get(parent.request_id, [])
        for bid in table:
            self.blocks[bid].ref_cnt += 1
        self._req_blocks[child.request_id] = list(table)
        self._num_cached_blocks[child.request_id] = self._num_cached_blocks.get(parent.request_id, 0)
        child.block_hashes = list(parent.block_hashes[:len(table)])

    def take_copies(self) -> list[tuple[int, int]]:
        """The (src, dst) block copies this step needs before its forward pass."""
        copies, self._copies = self._copies, []
        return copies

    def reset_prefix_cache(self) -> bool:
        """Forget every cached hash (only when no request holds a block)."""
        if self.num_used_blocks:
            return False
        for h, bid in self._cached.items():
            self.blocks[bid].block_hash = None
        self._cached.clear()
        return True

    def check_invariants(self) -> None:
        """Assert the pool is consistent (used by tests)."""
        refs = [0] * self.num_blocks
        for table in self._req_blocks.values():
            for bid in table:
                refs[bid] += 1
        for blk in self.blocks:
            assert blk.ref_cnt == refs[blk.block_id] >= 0, (blk, refs[blk.block_id])
            assert (blk.ref_cnt == 0) == (blk.block_id in self._free), blk
        for h, bid in self._cached.items():
            assert self.blocks[bid].block_hash == h
