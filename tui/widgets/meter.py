"""The context meter: tokens used / window as a bar, pins, summary, turns out of context, speed."""

from __future__ import annotations

from textual.widgets import Static

from ..display import MeterInfo

BAR = 20


def render_meter(info: MeterInfo, timings: bool = True) -> str:
    if not info.window:
        return "context: —" + (f" · ⚠ {info.unsaved} not saved yet — retrying" if info.unsaved else "")
    frac = min(1.0, info.used / info.window)
    full = round(frac * BAR)
    bar = "█" * full + "░" * (BAR - full)
    parts = [f"context {bar} {info.used:,}/{info.window:,} ({frac:.0%})", f"pinned {info.pinned}"]
    if info.summary:
        parts.append("summary in use")
    parts.append(f"{info.turns_out} turn{'s' if info.turns_out != 1 else ''} out of context")
    if timings and info.ttft_s is not None:
        parts.append(f"ttft {info.ttft_s:.2f}s · {info.tok_s or 0.0:.1f} tok/s")
    if info.unsaved:
        parts.append(f"⚠ {info.unsaved} message{'s' if info.unsaved != 1 else ''} not saved yet — retrying")
    return " · ".join(parts)


class ContextMeter(Static):
    def __init__(self, timings: bool = True, **kw: object) -> None:
        super().__init__("context: —", **kw)  # type: ignore[arg-type]
        self.timings = timings
        self.info = MeterInfo()

    def set_info(self, info: MeterInfo) -> None:
        self.info = info
        self.update(render_meter(info, self.timings))
        self.set_class(info.window > 0 and info.used / info.window > 0.9, "-full")
        self.set_class(info.unsaved > 0, "-unsaved")
