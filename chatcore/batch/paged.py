"""Paged KV memory: one pool of fixed-size blocks for every sequence of a model, and a slot per sequence.

Storage (:class:`PagedPool`; flash-attn's paged layout): ``k``, ``v`` [num_layers, num_blocks, block_size, Hkv, D]
in the compute dtype, or codes (int8 / float8_e4m3fn) when ``kv_dtype`` is set, with ``k_scale``, ``v_scale``
[num_layers, num_blocks, block_size, Hkv] float32 (one scale per token per head, :mod:`chatcore.layers.kv_quant`).
Keys are stored rotated. Block 0 is the scratch block: never given to a sequence, padded rows of a batch (a
CUDA graph's rows past the live batch) write and read there. Everything starts zeroed (a masked read of a
block never meets NaN garbage).

A :class:`PagedSlot` holds one sequence: its token ids, its blocks (``blocks``: the block of positions
``i * block_size ..`` is ``blocks[i]``) and KVCache's verb API (``common_prefix``, ``truncate``, ``drop``,
``reset``, ``reserve``, ``commit``), so the context manager's KV plans apply to it unchanged. Memory is taken a
block at a time as the sequence grows (``reserve``) and given back when it shrinks.

Sharing: full blocks whose contents a fresh prefill would compute are registered in the allocator's prefix cache
(:mod:`chatcore.batch.blocks`) on ``commit``; :meth:`PagedSlot.share_prefix` attaches another sequence's
matching blocks instead of computing them. A slot never writes into a block another sequence holds: it copies
the block first (copy on write). After a ``drop`` (an attention-sink shift) the moved keys remember the dropped
tokens in their deeper layers, so blocks from the drop on are never shared.

Eviction (the ``SlotPool`` policy, on blocks): when a slot needs blocks and none is free, the pool takes
(1) never-used free blocks, (2) blocks of released sequences that hold a registered prefix, least recently freed
first (they stay matchable until then), (3) the blocks of idle slots (alive but not in the running batch),
least recently used first: such a slot is reset (its tokens forgotten, as SlotPool forgets an evicted slot), so
its session prefills again on its next turn, and :attr:`PagedPool.evictions` counts it. A slot of the running
batch (:meth:`PagedPool.pinned`) is never evicted; :class:`~chatcore.errors.OutOfBlocks` when nothing else is left.
A slot's ``nbytes()`` is its blocks' bytes (a shared block counts in each sequence that holds it).

One thread drives a pool (the scheduler's); slots garbage-collected without a ``reset`` give their blocks back at
the pool's next allocation.
"""

from __future__ import annotations

import contextlib
import weakref
from collections import OrderedDict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import torch

from chatcore.batch.blocks import ROOT, BlockAllocator
from chatcore.errors import OutOfBlocks, PromptTooLong
from chatcore.layers.kv_quant import code_dtype, copy_rows, dequantize, quantize
from chatcore.layers.paged_attention import gather
from chatcore.prefix import common_prefix

DEFAULT_BLOCK_SIZE = 256   # flash-attn 2's paged KV needs a multiple of 256


def block_nbytes(*, num_layers: int, num_kv_heads: int, head_dim: int, block_size: int, dtype: torch.dtype,
                 kv_dtype: str | None = None) -> int:
    """Bytes one block takes across every layer (keys and values; codes and scales when quantized)."""
    per_row = num_kv_heads * head_dim
    if kv_dtype is None:
        token = 2 * per_row * torch.empty((), dtype=dtype).element_size()
    else:
        token = 2 * (per_row * torch.empty((), dtype=code_dtype(kv_dtype)).element_size() + num_kv_heads * 4)
    return num_layers * block_size * token


class PagedPool:
    """The KV storage of every sequence of one model (``rotary``: the model's, to re-rotate moved keys)."""

    def __init__(self, *, num_layers: int, num_kv_heads: int, head_dim: int, num_blocks: int,
                 dtype: torch.dtype, device: torch.device, rotary: Any = None,
                 block_size: int = DEFAULT_BLOCK_SIZE, kv_dtype: str | None = None) -> None:
        self.allocator = BlockAllocator(num_blocks, block_size, reserved=1)
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.num_blocks, self.block_size = num_blocks, block_size
        self.dtype, self.device, self.rotary, self.kv_dtype = dtype, torch.device(device), rotary, kv_dtype
        code = dtype if kv_dtype is None else code_dtype(kv_dtype)
        shape = (num_layers, num_blocks, block_size, num_kv_heads, head_dim)
        self.k = torch.zeros(shape, dtype=code, device=self.device)
        self.v = torch.zeros(shape, dtype=code, device=self.device)
        self.k_scale: torch.Tensor | None = None
        self.v_scale: torch.Tensor | None = None
        if kv_dtype is not None:
            self.k_scale = torch.zeros(shape[:4], dtype=torch.float32, device=self.device)
            self.v_scale = torch.zeros(shape[:4], dtype=torch.float32, device=self.device)
        self.block_bytes = block_nbytes(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                                        block_size=block_size, dtype=dtype, kv_dtype=kv_dtype)
        self._slots: OrderedDict[int, weakref.ref[PagedSlot]] = OrderedDict()   # least recently used first
        self._pinned: set[int] = set()
        self._orphans: list[list[int]] = []
        self.evictions = 0   # idle slots whose blocks were taken back

    @classmethod
    def sized(cls, memory: int, *, num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype,
              block_size: int = DEFAULT_BLOCK_SIZE, kv_dtype: str | None = None, **rest: Any) -> PagedPool:
        """A pool of as many blocks as ``memory`` bytes hold (the scratch block included; at least 2)."""
        per = block_nbytes(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim,
                           block_size=block_size, dtype=dtype, kv_dtype=kv_dtype)
        if memory // per < 2:
            raise OutOfBlocks(f"{memory} bytes of KV memory hold fewer than 2 blocks of {block_size} tokens "
                              f"({per} bytes each); give more memory or a smaller block size")
        return cls(num_layers=num_layers, num_kv_heads=num_kv_heads, head_dim=head_dim, num_blocks=memory // per,
                   dtype=dtype, block_size=block_size, kv_dtype=kv_dtype, **rest)

    @classmethod
    def for_model(cls, model: Any, *, memory: int | None = None, num_blocks: int | None = None,
                  block_size: int = DEFAULT_BLOCK_SIZE) -> PagedPool:
        """A pool for a :class:`~chatcore.models.base.CausalLM` (its ``slot_args``), sized by ``memory`` bytes
        or ``num_blocks`` (one of them)."""
        args = model.slot_args()
        if (memory is None) == (num_blocks is None):
            raise ValueError("give the pool's size as memory (bytes) or num_blocks, one of them")
        if memory is not None:
            return cls.sized(memory, block_size=block_size, **args)
        return cls(num_blocks=num_blocks, block_size=block_size, **args)

    @property
    def quantized(self) -> bool:
        return self.kv_dtype is not None

    def nbytes(self) -> int:
        """Bytes of the whole pool's storage."""
        return self.num_blocks * self.block_bytes

    def new_slot(self, capacity: int) -> PagedSlot:
        slot = PagedSlot(self, capacity)
        self._slots[id(slot)] = weakref.ref(slot)
        return slot

    # -- blocks for slots ------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def pinned(self, slots: Iterable[PagedSlot]) -> Iterator[None]:
        """While inside, none of ``slots`` (the running batch) is evicted to make room for another."""
        ids = {id(s) for s in slots} - self._pinned
        self._pinned |= ids
        try:
            yield
        finally:
            self._pinned -= ids

    def touch(self, slot: PagedSlot) -> None:
        """``slot`` was just used (the most recent for eviction)."""
        key = id(slot)
        if key in self._slots:
            self._slots.move_to_end(key)
        else:
            self._slots[key] = weakref.ref(slot)

    def take(self, n: int, slot: PagedSlot) -> list[int]:
        """``n`` blocks for ``slot`` (evicting idle slots, least recently used first, when none is free)."""
        self._reclaim_orphans()
        alloc = self.allocator
        if n > alloc.available:
            for key, ref in list(self._slots.items()):
                if alloc.available >= n:
                    break
                other = ref()
                if other is None:
                    del self._slots[key]
                    continue
                if other is slot or key in self._pinned or not other.blocks:
                    continue
                other.reset()
                self.evictions += 1
        return alloc.alloc(n)

    def copy_block(self, src: int, dst: int) -> None:
        for t in (self.k, self.v, self.k_scale, self.v_scale):
            if t is not None:
                t[:, dst] = t[:, src]

    def _orphan(self, blocks: list[int]) -> None:
        if blocks:
            self._orphans.append(list(blocks))   # freed at the next allocation (a finalizer may run anywhere)

    def _reclaim_orphans(self) -> None:
        while self._orphans:
            self.allocator.free(self._orphans.pop())

    def flat_rows(self, blocks: Sequence[int], positions: Iterable[int]) -> list[int]:
        """Rows of the flattened [num_blocks * block_size] storage of ``positions`` of a sequence."""
        bs = self.block_size
        return [blocks[p // bs] * bs + p % bs for p in positions]


class PagedSlot:
    """One sequence's tokens and blocks in a :class:`PagedPool` (make them with :meth:`PagedPool.new_slot`)."""

    def __init__(self, pool: PagedPool, capacity: int) -> None:
        if capacity <= 0:
            raise ValueError(f"a slot's capacity must be positive, got {capacity}")
        self.pool, self.capacity = pool, capacity
        self.tokens: list[int] = []
        self.blocks: list[int] = []   # changed in place only: the finalizer holds this list
        self._keys: list[int] = []    # chain keys of the leading full blocks
        self._clean: int | None = None   # positions from here on hold keys a fresh prefill would not (after a drop)
        self.decode_graph: object | None = None
        weakref.finalize(self, pool._orphan, self.blocks)

    # -- what KVCache tells -------------------------------------------------------------------------------------
    @property
    def length(self) -> int:
        return len(self.tokens)

    @property
    def allocated(self) -> int:
        """Token positions the slot's blocks hold."""
        return len(self.blocks) * self.pool.block_size

    @property
    def quantized(self) -> bool:
        return self.pool.kv_dtype is not None

    @property
    def kv_dtype(self) -> str | None:
        return self.pool.kv_dtype

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype (what attention reads)."""
        return self.pool.dtype

    @property
    def rotary(self) -> Any:
        return self.pool.rotary

    def nbytes(self) -> int:
        """Bytes of the blocks this slot holds (a shared block counts in every slot holding it)."""
        return len(self.blocks) * self.pool.block_bytes

    def table(self, width: int) -> list[int]:
        """The block table padded with 0 (the scratch block) to ``width`` entries."""
        if width < len(self.blocks):
            raise ValueError(f"a table of {width} entries cannot hold {len(self.blocks)} blocks")
        return self.blocks + [0] * (width - len(self.blocks))

    def layer_kv(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Layer ``layer``'s keys and values of positions 0 .. end-1, [Hkv, end, D] in the compute dtype (copies)."""
        p = self.pool
        table = torch.tensor(self.blocks, dtype=torch.long)
        ks = None if p.k_scale is None else p.k_scale[layer]
        vs = None if p.v_scale is None else p.v_scale[layer]
        return gather(p.k[layer], table, 0, end, ks, p.dtype), gather(p.v[layer], table, 0, end, vs, p.dtype)

    def common_prefix(self, ids: Sequence[int]) -> int:
        """How many leading tokens of ``ids`` this slot already holds."""
        return common_prefix(self.tokens, ids)

    # -- growth and writes -------------------------------------------------------------------------------------
    def reserve(self, extra: int) -> None:
        """Make positions ``length .. length + extra - 1`` writable: blocks taken as needed (evicting idle
        slots, :class:`OutOfBlocks` when nothing is left), a shared block copied first; :class:`PromptTooLong`
        past the capacity."""
        need = self.length + extra
        if need > self.capacity:
            raise PromptTooLong(
                f"{need} tokens do not fit the context window of {self.capacity}; "
                "shorten the prompt or raise the window (max_seq_len)")
        self.pool.touch(self)
        more = -(-need // self.pool.block_size) - len(self.blocks)
        if more > 0:
            self.blocks.extend(self.pool.take(more, self))
        self._writable(self.length, need)

    def _writable(self, lo: int, hi: int) -> None:
        """Blocks of positions lo .. hi-1 (held) become this slot's own: copied where shared, unregistered."""
        if hi <= lo:
            return
        bs, alloc = self.pool.block_size, self.pool.allocator
        for i in range(lo // bs, -(-hi // bs)):
            block = self.blocks[i]
            if alloc.refcount(block) > 1:
                new = self.pool.take(1, self)[0]
                self.pool.copy_block(block, new)
                alloc.free([block])
                self.blocks[i] = new
            else:
                alloc.forget(block)
        del self._keys[lo // bs:]

    def commit(self, ids: Sequence[int]) -> None:
        """Record the token ids whose keys/values the last forward pass wrote; full blocks become shareable."""
        if self.length + len(ids) > self.allocated:
            raise ValueError(f"{len(ids)} tokens committed past the {self.allocated} positions reserved")
        self.tokens.extend(int(i) for i in ids)
        self.pool.touch(self)
        self._register()

    def _register(self) -> None:
        bs, alloc = self.pool.block_size, self.pool.allocator
        full = self.length // bs if self._clean is None else min(self.length, self._clean) // bs
        for i in range(len(self._keys), full):
            parent = self._keys[i - 1] if i else ROOT
            self._keys.append(alloc.register(self.blocks[i], parent, self.tokens[i * bs: (i + 1) * bs]))

    def share_prefix(self, ids: Sequence[int]) -> int:
        """Attach registered blocks (another sequence's, or a released one's) holding the next full blocks of
        ``ids`` after this slot's tokens, leaving at least the last id to run; returns how many of ``ids`` they
        hold (now committed to the slot). Only a slot that ends on a block boundary, holding no block past its
        tokens, with clean keys, shares."""
        bs = self.pool.block_size
        n = self.length
        if (n % bs or len(self.blocks) != n // bs or len(self._keys) != n // bs or n + len(ids) > self.capacity
                or len(ids) <= bs):
            return 0
        self.pool._reclaim_orphans()
        alloc = self.pool.allocator
        usable = (len(ids) - 1) // bs * bs
        got = alloc.match(ids[:usable], self._keys[-1] if self._keys else ROOT)
        if not got:
            return 0
        self.blocks.extend(got)
        self._keys.extend(alloc.key_of(b) for b in got)
        k = len(got) * bs
        self.tokens.extend(int(i) for i in ids[:k])
        self.pool.touch(self)
        return k

    # -- the verb API -----------------------------------------------------------------------------------------
    def truncate(self, n: int) -> None:
        """Keep the first ``n`` tokens (blocks past them given back)."""
        if not 0 <= n <= self.length:
            raise ValueError(f"cannot truncate a slot of {self.length} tokens to {n}")
        del self.tokens[n:]
        del self._keys[n // self.pool.block_size:]
        self._shrink(n)
        if self._clean is not None and n <= self._clean:
            self._clean = None

    def _shrink(self, n: int) -> None:
        keep = -(-n // self.pool.block_size)
        tail = self.blocks[keep:]
        del self.blocks[keep:]
        self.pool.allocator.free(tail)

    @torch.inference_mode()
    def drop(self, start: int, end: int) -> None:
        """Remove tokens ``start .. end-1``; what follows moves back by ``end - start`` positions.

        Moved keys are re-rotated by ``-(end - start)`` (RoPE; none for ALiBi models). Quantized: the moved keys
        are dequantized (float32), re-rotated and quantized again; values move as codes and scales, unchanged.
        Blocks written are copied first where shared; blocks past the new end are given back.
        """
        if not 0 <= start <= end <= self.length:
            raise ValueError(f"cannot drop [{start}, {end}) from a slot of {self.length} tokens")
        delta = end - start
        if delta == 0:
            return
        n = self.length
        moved = n - end
        if not moved:
            self.truncate(start)
            return
        p = self.pool
        src = torch.tensor(p.flat_rows(self.blocks, range(end, n)), dtype=torch.long, device=p.device)
        flat = [None if t is None else t.flatten(1, 2) for t in (p.k, p.v, p.k_scale, p.v_scale)]
        k, v, ks, vs = (None if t is None else t.index_select(1, src) for t in flat)   # copies: read before writes
        self._writable(start, start + moved)
        dst = torch.tensor(p.flat_rows(self.blocks, range(start, start + moved)), dtype=torch.long, device=p.device)
        rotary = p.rotary
        for layer in range(p.num_layers):
            r = None if rotary is None else getattr(rotary, "per_layer", None)
            shift = None if rotary is None else (rotary.shift if r is None else r[layer].shift)
            if ks is None:
                kl = k[layer] if shift is None else shift(k[layer], -delta)
                flat[0][layer].index_copy_(0, dst, kl)
            else:
                codes, sc = k[layer], ks[layer]
                if shift is not None:
                    codes, sc = quantize(shift(dequantize(codes, sc, torch.float32), -delta), codes.dtype)
                copy_rows(flat[0][layer], 0, dst, codes)
                flat[2][layer].index_copy_(0, dst, sc)
        copy_rows(flat[1], 1, dst, v)
        if vs is not None:
            flat[3].index_copy_(1, dst, vs)
        del self.tokens[start:end]
        self._shrink(n - delta)
        self._clean = start if self._clean is None else min(self._clean, start)

    def reset(self) -> None:
        """Forget every token; the blocks go back to the pool (registered prefixes stay matchable)."""
        self.pool.allocator.free(self.blocks)
        self.blocks.clear()
        self.tokens.clear()
        self._keys.clear()
        self._clean = None

