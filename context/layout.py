"""The context policy as one frozen config: placement order, budget, watermarks, KV and summary modes."""

from __future__ import annotations

from dataclasses import dataclass

REGIONS: tuple[str, ...] = ("system", "pinned", "summary", "history", "new")
DEFAULT_SUMMARY_PROMPT = (
    "Summarize the conversation below in a few sentences. Keep names, numbers, decisions and facts the "
    "user stated; leave out pleasantries. Write only the summary.")


@dataclass(frozen=True)
class Layout:
    """Order of the regions in the prompt. `system` must come first and `new` last.

    The default is system, pinned, summary, history, new. ("system", "summary", "history", "pinned",
    "new") restates pinned messages just before the new message (at the cost of re-prefilling them
    every turn, since they then follow the growing history).
    """

    order: tuple[str, ...] = REGIONS

    def __post_init__(self) -> None:
        order = tuple(self.order)
        object.__setattr__(self, "order", order)
        if sorted(order) != sorted(REGIONS):
            raise ValueError(f"layout order must list each of {', '.join(REGIONS)} once, got {order!r}")
        if order[0] != "system" or order[-1] != "new":
            raise ValueError("layout order must start with 'system' and end with 'new'")


@dataclass(frozen=True)
class ContextConfig:
    """How a session fills its window. Checked on creation.

    window: tokens the model may see (None: the engine's window; larger values are capped to it).
    reply_reserve: tokens kept free for the reply; the prompt budget is window - reply_reserve.
    high_watermark / low_watermark: fractions of the prompt budget. When a prompt would pass the high
      one, whole turns are pruned until it is at or under the low one (hysteresis: the kept prefix,
      and so the KV cache, stays put for many turns).
    kv_mode: "exact" re-prefills everything after a change (default); "shift" drops the pruned span
      from the cache and shifts what follows (RoPE keys re-rotated; approximate, like llama.cpp).
    oversize: a single message that cannot fit even alone: "error" (default) or "truncate" (keep its
      head and tail around `truncation_marker`; the stored message keeps its full text).
    summarize: let the model write a summary of pruned turns into the summary region.
    """

    window: int | None = None
    reply_reserve: int = 512
    high_watermark: float = 0.9
    low_watermark: float = 0.6
    layout: Layout = Layout()
    kv_mode: str = "exact"
    shift_min_tokens: int = 16
    oversize: str = "error"
    truncation_marker: str = "\n[...]\n"
    summarize: bool = False
    summary_prompt: str = DEFAULT_SUMMARY_PROMPT
    summary_max_tokens: int = 200
    summary_role: str = "system"
    summary_prefix: str = "Summary of the earlier conversation: "
    sink_tokens: int = 4

    def __post_init__(self) -> None:
        if self.window is not None and self.window < 16:
            raise ValueError(f"window must be at least 16 tokens (or None for the model's), got {self.window}")
        if self.reply_reserve < 0:
            raise ValueError(f"reply_reserve must be >= 0, got {self.reply_reserve}")
        if self.window is not None and self.reply_reserve >= self.window:
            raise ValueError(f"reply_reserve ({self.reply_reserve}) must be smaller than the window ({self.window})")
        if not 0.0 < self.low_watermark <= self.high_watermark <= 1.0:
            raise ValueError("watermarks must satisfy 0 < low_watermark <= high_watermark <= 1, got "
                             f"{self.low_watermark} and {self.high_watermark}")
        if self.kv_mode not in ("exact", "shift"):
            raise ValueError(f"kv_mode must be 'exact' or 'shift', got {self.kv_mode!r}")
        if self.shift_min_tokens < 1:
            raise ValueError("shift_min_tokens must be >= 1")
        if self.oversize not in ("error", "truncate"):
            raise ValueError(f"oversize must be 'error' or 'truncate', got {self.oversize!r}")
        if not isinstance(self.layout, Layout):
            raise ValueError("layout must be a context.Layout")
        if self.summary_max_tokens < 1:
            raise ValueError("summary_max_tokens must be >= 1")
        if self.summary_role not in ("system", "user", "assistant"):
            raise ValueError(f"summary_role must be system, user or assistant, got {self.summary_role!r}")
        if self.sink_tokens < 0:
            raise ValueError(f"sink_tokens must be >= 0, got {self.sink_tokens}")

    def budget(self, engine_window: int) -> tuple[int, int]:
        """(window, prompt budget) for an engine whose window is `engine_window`."""
        window = engine_window if self.window is None else min(self.window, engine_window)
        reserve = min(self.reply_reserve, window // 2)
        return window, window - reserve
