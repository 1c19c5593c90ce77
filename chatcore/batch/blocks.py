"""Which KV blocks are free, who holds them, and which full blocks hold a prefix other sequences can share.

Pure Python (no torch): the bookkeeping of :class:`chatcore.batch.paged.PagedPool`, testable on its own.

A block holds ``block_size`` consecutive tokens of one sequence. Each block has a reference count: the number
of sequences whose block table holds it. A *full* block whose keys and values are those a fresh prefill of its
tokens computes (after the same earlier tokens) can be *registered* under a hash chain: its key is the hash of
the previous block's key and its own token ids, so equal keys mean equal prefixes up to and including that
block (the block's own token ids are stored beside it and compared as well). A new sequence whose prompt starts
with registered blocks :meth:`~BlockAllocator.match`-es them and shares them (reference count + 1) instead of
computing them again: e.g. one system prompt's blocks, shared by every conversation that starts with it.

When a registered block's last holder frees it, it stays registered and reusable (a later sequence with that
prefix still matches it) until memory is needed: :meth:`~BlockAllocator.alloc` takes never-registered free
blocks first, then recycles registered free ones, least recently freed first. :class:`OutOfBlocks` when
neither is left.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence

from chatcore.errors import OutOfBlocks

ROOT = 0   # the parent key of a sequence's first block


def chain_key(parent: int, tokens: Sequence[int]) -> int:
    """The key of a full block holding ``tokens`` after the block whose key is ``parent`` (ROOT: the first)."""
    return hash((parent, tuple(tokens)))


class BlockAllocator:
    """Blocks ``reserved .. num_blocks - 1`` of ``block_size`` tokens (blocks below ``reserved`` are never given:
    the paged pool keeps block 0 as the scratch block padded rows write to)."""

    def __init__(self, num_blocks: int, block_size: int, reserved: int = 1) -> None:
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size must be a power of two, got {block_size}")
        if not 0 <= reserved < num_blocks:
            raise ValueError(f"{num_blocks} blocks leave none to give beside the {reserved} reserved")
        self.num_blocks, self.block_size, self.reserved = num_blocks, block_size, reserved
        self._ref = [0] * num_blocks
        self._free = list(range(num_blocks - 1, reserved - 1, -1))   # pop() gives the lowest first
        self._idle: OrderedDict[int, None] = OrderedDict()   # registered blocks nobody holds, least recent first
        self._by_key: dict[int, int] = {}                     # chain key -> block
        self._entry: dict[int, tuple[int, int, tuple[int, ...]]] = {}   # block -> (key, parent key, tokens)
        self.recycled = 0   # registered blocks recycled for new contents
        self.hits = 0       # blocks a match shared instead of computing them

    # -- counts -------------------------------------------------------------------------------------------
    @property
    def usable(self) -> int:
        """Blocks this allocator can give at all (all but the reserved ones)."""
        return self.num_blocks - self.reserved

    @property
    def available(self) -> int:
        """Blocks :meth:`alloc` can give now: free ones and registered ones nobody holds."""
        return len(self._free) + len(self._idle)

    @property
    def in_use(self) -> int:
        """Blocks some sequence holds."""
        return self.usable - self.available

    def refcount(self, block: int) -> int:
        return self._ref[block]

    def registered(self, block: int) -> bool:
        return block in self._entry

    def key_of(self, block: int) -> int:
        """The chain key a registered block is known by."""
        return self._entry[block][0]

    # -- giving and taking back -------------------------------------------------------------------------------
    def alloc(self, n: int) -> list[int]:
        """``n`` blocks, each held once (reference count 1); all or none (:class:`OutOfBlocks`)."""
        if n < 0:
            raise ValueError(f"cannot allocate {n} blocks")
        if n > self.available:
            raise OutOfBlocks(
                f"the paged KV memory is full: {n} more blocks of {self.block_size} tokens are needed and "
                f"{self.available} of {self.usable} are free; finish or cancel some sequences, or give the "
                "engine more KV memory (kv_memory)")
        out = []
        for _ in range(n):
            if self._free:
                block = self._free.pop()
            else:
                block, _ = self._idle.popitem(last=False)
                self._unregister(block)
                self.recycled += 1
            self._ref[block] = 1
            out.append(block)
        return out

    def free(self, blocks: Sequence[int]) -> None:
        """Drop one hold of each block; a block nobody holds becomes free (kept reusable if registered)."""
        for block in blocks:
            if self._ref[block] <= 0:
                raise ValueError(f"block {block} is not held")
            self._ref[block] -= 1
            if self._ref[block] == 0:
                if block in self._entry:
                    self._idle[block] = None
                else:
                    self._free.append(block)

    def hold(self, block: int) -> None:
        """One more hold of a block (a sequence shares it)."""
        if self._ref[block] == 0:
            if block not in self._idle:
                raise ValueError(f"block {block} is free: allocate it instead")
            del self._idle[block]
        self._ref[block] += 1

    # -- the prefix cache ---------------------------------------------------------------------------------------
    def register(self, block: int, parent: int, tokens: Sequence[int]) -> int:
        """Record that the held full ``block`` holds ``tokens`` after the block keyed ``parent``; returns its
        chain key. Where another block is known by that key already, that one stays the shared one."""
        if len(tokens) != self.block_size:
            raise ValueError(f"only full blocks ({self.block_size} tokens) are shared, got {len(tokens)}")
        if self._ref[block] <= 0:
            raise ValueError(f"block {block} is not held")
        toks = tuple(int(t) for t in tokens)
        key = chain_key(parent, toks)
        old = self._entry.get(block)
        if old is not None:
            if old[0] == key:
                return key
            self._unregister(block)
        if key not in self._by_key:
            self._by_key[key] = block
            self._entry[block] = (key, parent, toks)
        return key

    def forget(self, block: int) -> None:
        """The block's contents are about to change: it is no longer a shareable prefix."""
        if block in self._entry:
            self._unregister(block)
            if block in self._idle:
                del self._idle[block]
                self._free.append(block)

    def match(self, tokens: Sequence[int], parent: int = ROOT) -> list[int]:
        """The registered blocks holding the leading full blocks of ``tokens`` (after the block keyed ``parent``),
        each now held once more; stops at the first block not found."""
        bs = self.block_size
        out: list[int] = []
        for i in range(len(tokens) // bs):
            toks = tuple(int(t) for t in tokens[i * bs: (i + 1) * bs])
            key = chain_key(parent, toks)
            block = self._by_key.get(key)
            if block is None or self._entry[block] != (key, parent, toks):
                break
            self.hold(block)
            out.append(block)
            parent = key
        self.hits += len(out)
        return out

    def _unregister(self, block: int) -> None:
        key = self._entry.pop(block)[0]
        if self._by_key.get(key) == block:
            del self._by_key[key]
