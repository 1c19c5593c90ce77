"""The engine: token ids in, token ids (and their text) out, one KV cache slot per sequence."""

from __future__ import annotations

import array
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from chatcore.config import ModelConfig
from chatcore.errors import PromptTooLong, TokenizerMissing
from chatcore.generation import Generation, ReplyState, ScoreResult, TokenEvent, score_result
from chatcore.kv_cache import KVCache
from chatcore.models.base import CausalModel
from chatcore.prefix import reused_prefix
from chatcore.runtime import Runtime, activation_bytes_per_token, fit_chunk
from chatcore.sampling import MAX_TOP_LOGPROBS, Sampled, Sampler, SamplingParams
from chatcore.tokenizer import Tokenizer

if TYPE_CHECKING:
    from chatcore.cuda_graph import DecodeGraph


class _TokenFetch:
    """Reads a sampled token (and its logprob report) from the device without waiting for work queued after it.

    The plain token is copied as it is (int64); a logprob report (:func:`chatcore.sampling.logprob_report`,
    the token among its float32 values) is copied instead of it, in one transfer."""

    def __init__(self) -> None:
        self.token = torch.empty(1, dtype=torch.int64, pin_memory=True)
        self.packed = torch.empty(2 + 2 * MAX_TOP_LOGPROBS, dtype=torch.float32, pin_memory=True)
        self.event = torch.cuda.Event()
        self.width = 0   # values of the packed report (0: the plain token)

    def start(self, token: torch.Tensor, packed: torch.Tensor | None) -> None:
        if packed is None:
            self.token.copy_(token.reshape(1), non_blocking=True)
            self.width = 0
        else:
            self.width = packed.shape[0]
            self.packed[: self.width].copy_(packed, non_blocking=True)
        self.event.record()

    def result(self) -> Sampled:
        self.event.synchronize()
        if not self.width:
            return Sampled(int(self.token[0]), None, None)
        return Sampler.unpack(self.packed[: self.width].tolist())


class Engine:
    def __init__(self, model: CausalModel, config: ModelConfig, runtime: Runtime, tokenizer: Tokenizer | None,
                 source: str = "") -> None:
        self.model = model
        self.config = config
        self.runtime = runtime
        self.tokenizer = tokenizer
        self.source = source
        eos = set(config.eos_token_ids)
        if tokenizer is not None:
            eos.update(tokenizer.eos_token_ids)
        self.eos_token_ids = frozenset(eos)
        self._graph_pool = None
        self._fetch: _TokenFetch | None = None

    @property
    def window(self) -> int:
        return self.runtime.max_seq_len

    def new_slot(self, capacity: int | None = None) -> KVCache:
        """A KV cache slot to keep between calls (its tokens are reused as a prefix).

        With CUDA graphs the slot is allocated whole up front (a captured graph needs buffers that never move).
        """
        return self.model.new_slot(min(capacity or self.window, self.window),
                                    preallocate=self.runtime.uses_cuda_graphs)

    # -- forward passes -----------------------------------------------------------------------------
    def _check_ids(self, ids: Sequence[int]) -> list[int]:
        # one C pass that refuses anything but integers, then a vectorised range check: a 33k-token warm turn's
        # history costs ~0.3 ms here (numpy's asarray + tolist took ~2 ms of a 30 ms time to first token)
        if isinstance(ids, (str, bytes)):
            raise ValueError("the prompt must be a flat sequence of integer token ids")
        try:
            arr = np.frombuffer(array.array("q", ids), dtype=np.int64)
        except (TypeError, OverflowError):
            raise ValueError("the prompt must be a flat sequence of integer token ids") from None
        if arr.size == 0:
            raise ValueError("the prompt is empty: give at least one token")
        bad = arr[(arr < 0) | (arr >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary (0..{self.config.vocab_size - 1})")
        return ids if type(ids) is list else arr.tolist()

    @torch.inference_mode()
    def _run(self, ids: Sequence[int], slot: KVCache, *, all_logits: bool = False) -> torch.Tensor:
        x = torch.tensor(ids, dtype=torch.long, device=self.runtime.device)
        out = self.model.forward(x, slot, all_logits=all_logits)
        slot.commit(ids)
        return out

    def _graph(self, slot: KVCache):  # noqa: ANN202
        """The slot's captured decode step (captured on first use), or None where graphs do not apply."""
        if not (self.runtime.uses_cuda_graphs and slot.allocated == slot.capacity):
            return None
        if slot.decode_graph is None:
            if self._graph_pool is None:
                self._graph_pool = torch.cuda.graph_pool_handle()
            slot.decode_graph = self.model.capture_decode(slot, self._graph_pool)
        return slot.decode_graph

    @torch.inference_mode()
    def _step(self, token: int, slot: KVCache) -> torch.Tensor:
        """One decode step: the slot's CUDA graph when it has one, else an eager forward pass."""
        graph = self._graph(slot)
        if graph is None:
            return self._run([token], slot)[-1]
        logits = graph.step(token)
        slot.commit([token])
        return logits[-1]

    def prefill(self, ids: Sequence[int], slot: KVCache, *, all_logits: bool = False,
                sink_tokens: int | None = None) -> torch.Tensor:
        """Append ``ids`` to the slot in chunks; return logits of the last token (or of all tokens).

        With ``sink_tokens``, a slot that fills up keeps its first ``sink_tokens`` tokens and drops the
        oldest ones after them (StreamingLLM), so ``ids`` may be longer than the window.
        """
        chunk = self.prefill_chunk_size()
        if sink_tokens is None:
            if slot.length + len(ids) > slot.capacity:
                raise PromptTooLong(
                    f"the prompt needs {slot.length + len(ids)} tokens but the context window is "
                    f"{slot.capacity}; shorten it or raise the window")
        else:
            chunk = min(chunk, self._shift_size(slot, sink_tokens))
        outs = []
        for i in range(0, len(ids), chunk):
            piece = ids[i : i + chunk]
            if sink_tokens is not None:
                self.make_room(slot, len(piece), sink_tokens)
            outs.append(self._run(piece, slot, all_logits=all_logits))
        return torch.cat(outs) if all_logits else outs[-1]

    def prefill_chunk_size(self) -> int:
        """Prompt tokens per forward pass now: the runtime's, lowered on a GPU (default setting) to what half the
        memory free now holds (free on the device plus what PyTorch's allocator holds unused)."""
        rt = self.runtime
        if not (rt.chunk_by_memory and rt.device.type == "cuda"):
            return rt.prefill_chunk
        free, _ = torch.cuda.mem_get_info(rt.device)
        free += torch.cuda.memory_reserved(rt.device) - torch.cuda.memory_allocated(rt.device)
        per_token = activation_bytes_per_token(self.config.hidden_size, self.config.intermediate_size, rt.dtype)
        return fit_chunk(rt.prefill_chunk, free // 2, per_token)

    @staticmethod
    def _shift_size(slot: KVCache, sink_tokens: int) -> int:
        """Tokens one shift frees: half of what is not a sink (as llama.cpp's context shift)."""
        if not 0 <= sink_tokens < slot.capacity - 1:
            raise ValueError(f"sink_tokens must be in [0, {slot.capacity - 2}] for a window of {slot.capacity}")
        return max(1, (slot.capacity - sink_tokens) // 2)

    def make_room(self, slot: KVCache, need: int, sink_tokens: int) -> int:
        """Shift the slot's oldest non-sink tokens out until ``need`` more fit; returns tokens dropped."""
        overflow = slot.length + need - slot.capacity
        if overflow <= 0:
            return 0
        drop = min(max(overflow, self._shift_size(slot, sink_tokens)), slot.length - sink_tokens)
        if drop < overflow:
            raise PromptTooLong(f"{need} new tokens do not fit a window of {slot.capacity} beside "
                                f"{sink_tokens} sink tokens")
        slot.drop(sink_tokens, sink_tokens + drop)
        return drop

    def logits(self, ids: Sequence[int]) -> torch.Tensor:
        """Logits [len(ids), vocab] (float32, on the CPU) for scoring and checks; uses a scratch slot."""
        ids = self._check_ids(ids)
        return self.prefill(ids, self.new_slot(len(ids)), all_logits=True).float().cpu()

    # -- generation --------------------------------------------------------------------------------
    def generate(self, ids: Sequence[int], params: SamplingParams | None = None, *,
                 slot: KVCache | None = None, sink_tokens: int | None = None) -> Generation:
        """Stream the continuation of ``ids``. With a ``slot``, its matching prefix is not recomputed.

        The prompt is prefilled now (so :class:`PromptTooLong` is raised here); tokens come as the returned
        :class:`Generation` is iterated. ``sink_tokens``: instead of stopping when the window is full, keep the
        first ``sink_tokens`` tokens and shift the oldest others out (a sliding window with attention sinks), so
        prompt and reply together may run past the window with flat memory and no re-prefill.
        """
        params = params or SamplingParams()
        ids = self._check_ids(ids)
        slot = slot if slot is not None else self.new_slot()
        if sink_tokens is None and len(ids) > slot.capacity:
            raise PromptTooLong(f"the prompt has {len(ids)} tokens but the context window is {slot.capacity}; "
                                "shorten it or raise the window")
        t0 = time.perf_counter()
        keep = reused_prefix(slot.tokens, ids)
        slot.truncate(keep)
        before = slot.length
        logits = self.prefill(ids[keep:], slot, sink_tokens=sink_tokens)[-1]
        reply = ReplyState(ids, params, keep, t0, before + len(ids) - keep - slot.length,
                           vocab_size=self.config.vocab_size, device=self.runtime.device, tokenizer=self.tokenizer,
                           eos_ids=self.eos_token_ids)
        graph = self._graph(slot) if slot.length < slot.capacity else None
        if graph is not None:
            events = self._decode_graph(reply, logits, slot, graph, sink_tokens)
        else:
            events = self._decode_eager(reply, logits, slot, sink_tokens)
        return Generation(reply, events)

    def _decode_graph(self, reply: ReplyState, logits: torch.Tensor, slot: KVCache, graph: DecodeGraph,
                      sink_tokens: int | None) -> Iterator[TokenEvent]:
        """Decode on the GPU with the slot's CUDA graph. The next step is queued on the sampled token before the
        host reads it (through pinned memory), so the host's work per token (reading it, detokenizing, stop
        strings, the caller) overlaps the GPU's. A step queued for a token that ends the reply is dropped: it
        wrote only the row past the slot's last token."""
        if self._fetch is None:
            self._fetch = _TokenFetch()   # pinned host memory: allocated once per engine
        fetch, sampler, limit, sinks = self._fetch, reply.sampler, reply.limit, sink_tokens is not None
        try:
            while True:
                token_t, packed = sampler.pick(logits)
                fetch.start(token_t, packed)
                more = reply.n + 1 < limit and (sinks or slot.length < slot.capacity)
                if more:
                    if slot.length >= slot.capacity:
                        reply.discarded += self.make_room(slot, 1, sink_tokens)
                    logits = graph.launch(token_t)[-1]
                token, logprob, top = fetch.result()
                ended, text, stopped = reply.take(token)
                if ended:
                    break
                if more:
                    slot.commit([token])   # the queued step ran on this token: its keys/values are in the slot
                if stopped or not more:
                    break
                yield TokenEvent(token, text, logprob, top_logprobs=top)
        except GeneratorExit:
            reply.cancelled()
            raise
        yield reply.last(token, text, logprob, ended, stopped, top)

    def _decode_eager(self, reply: ReplyState, logits: torch.Tensor, slot: KVCache,
                      sink_tokens: int | None) -> Iterator[TokenEvent]:
        """Decode step by step: sample, read the token, run the step on it (the slot's CUDA graph where it has
        one, else a forward pass)."""
        sampler, limit, sinks = reply.sampler, reply.limit, sink_tokens is not None
        try:
            while True:
                token, logprob, top = sampler.sample(logits)
                ended, text, stopped = reply.take(token)
                if ended:
                    break
                more = reply.n < limit and (sinks or slot.length < slot.capacity)
                if more:
                    if slot.length >= slot.capacity:
                        reply.discarded += self.make_room(slot, 1, sink_tokens)
                    logits = self._step(token, slot)
                if stopped or not more:
                    break
                yield TokenEvent(token, text, logprob, top_logprobs=top)
        except GeneratorExit:
            reply.cancelled()
            raise
        yield reply.last(token, text, logprob, ended, stopped, top)

    # -- scoring -----------------------------------------------------------------------------------
    @torch.inference_mode()
    def score(self, ids: Sequence[int], continuation: Sequence[int], *, slot: KVCache | None = None) -> ScoreResult:
        """How well the model predicts ``continuation`` after the prompt ``ids``, in one prefill of both.

        With a ``slot``, its matching prefix of ``ids`` is not recomputed (as in :meth:`generate`); afterwards
        it holds ``ids`` and ``continuation``. Raises :class:`PromptTooLong` when they do not fit it.
        """
        ids = self._check_ids(ids)
        cont = self._check_ids(continuation) if len(continuation) else []
        slot = slot if slot is not None else self.new_slot()
        full = ids + cont
        t0 = time.perf_counter()
        keep = reused_prefix(slot.tokens, ids)
        slot.truncate(keep)
        logits = self.prefill(full[keep:], slot, all_logits=True)
        return score_result(logits, ids, cont, keep, time.perf_counter() - t0)

    def close(self) -> None:
        """Release what the model holds besides memory: a tensor-parallel engine's worker processes and
        process group. Nothing for a single-process model; the engine is unusable after it with tensor parallel."""
        close = getattr(self.model, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> Engine:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def require_tokenizer(self) -> Tokenizer:
        if self.tokenizer is None:
            raise TokenizerMissing(f"{self.source} has no tokenizer (tokenizer.json); give token ids instead")
        return self.tokenizer
