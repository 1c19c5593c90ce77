"""Key bindings: one table of actions with default keys, remappable from a file or the environment.

Remap with ``$CHATCORE_KEYMAP`` ("regenerate=ctrl+r,edit=f5") or a file ``keymap.toml`` in
``$CHATCORE_HOME`` (else ``~/.config/chatcore``) holding lines ``regenerate = "ctrl+r"``. Several keys
for one action are comma-separated ("ctrl+r,f5"). Ids are the names in ACTIONS. Defaults avoid the
keys the message input uses itself (ctrl+a/e/k/u/w/x/c/v/d).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from textual.binding import Binding

PREFIX = "chatcore."
ENV_KEYMAP = "CHATCORE_KEYMAP"


@dataclass(frozen=True)
class Action:
    id: str
    key: str
    action: str
    description: str
    show: bool = True


ACTIONS: tuple[Action, ...] = (
    Action("cancel", "escape", "cancel", "Cancel reply"),
    Action("new", "ctrl+n", "new_session", "New session"),
    Action("regenerate", "ctrl+r", "regenerate", "Regenerate"),
    Action("edit", "f4", "edit", "Edit message"),
    Action("pin", "ctrl+t", "toggle_pin", "Pin / unpin"),
    Action("copy", "ctrl+y", "copy_message", "Copy message"),
    Action("copy_code", "f6", "copy_code", "Copy code block", show=False),
    Action("select_prev", "alt+up", "select(-1)", "Select previous message", show=False),
    Action("select_next", "alt+down", "select(1)", "Select next message", show=False),
    Action("branch_prev", "alt+left", "branch(-1)", "Previous branch of the message", show=False),
    Action("branch_next", "alt+right", "branch(1)", "Next branch of the message", show=False),
    Action("system", "ctrl+o", "system_prompt", "System prompt", show=False),
    Action("params", "ctrl+g", "params", "Parameters", show=False),
    Action("export_json", "f10", "export('json')", "Export JSON", show=False),
    Action("export_md", "shift+f10", "export('markdown')", "Export Markdown", show=False),
    Action("sessions", "ctrl+b", "toggle_sessions", "Sessions", show=False),
    Action("filter", "ctrl+f", "filter_sessions", "Filter sessions", show=False),
    Action("rename", "f2", "rename_session", "Rename session", show=False),
    Action("delete", "f8", "delete_session", "Delete session", show=False),
    Action("help", "f1", "help", "Help"),
)
BY_ID = {a.id: a for a in ACTIONS}


def bindings() -> list[Binding]:
    return [Binding(a.key, a.action, a.description, show=a.show, id=PREFIX + a.id)
            for a in ACTIONS]


def config_dir(env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    home = env.get("CHATCORE_HOME")
    return Path(home) if home else Path.home() / ".config" / "chatcore"


def parse_pairs(text: str, sep: str = ",") -> dict[str, str]:
    """'regenerate=ctrl+r,edit=f5' -> {'regenerate': 'ctrl+r', 'edit': 'f5'}; unknown ids raise ValueError."""
    out: dict[str, str] = {}
    current: str | None = None
    for part in (p.strip() for p in text.split(sep)):
        if not part:
            continue
        if "=" in part:
            current, _, key = (s.strip() for s in part.partition("="))
            _check(current)
            out[current] = key
        elif current is not None:  # "regenerate=ctrl+r,f5": a second key for the same action
            out[current] += "," + part
    return out


def parse_file(text: str) -> dict[str, str]:
    """Lines ``action = "key"`` (TOML-style; '#' comments)."""
    out: dict[str, str] = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if not line or line.startswith("["):
            continue
        name, eq, value = line.partition("=")
        if not eq:
            raise ValueError(f"keymap line {line!r}: expected action = \"key\"")
        name = name.strip()
        _check(name)
        out[name] = value.strip().strip("\"'")
    return out


def _check(name: str) -> None:
    if name not in BY_ID:
        raise ValueError(f"unknown key binding {name!r}; use one of {', '.join(BY_ID)}")


def load_keymap(path: Path | None = None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Overrides by action id (file first, then the environment). Bad entries raise ValueError."""
    env = os.environ if env is None else env
    path = path if path is not None else config_dir(env) / "keymap.toml"
    out: dict[str, str] = {}
    if path.is_file():
        out.update(parse_file(path.read_text(encoding="utf-8")))
    if env.get(ENV_KEYMAP):
        out.update(parse_pairs(env[ENV_KEYMAP]))
    return out


def effective_keys(overrides: Mapping[str, str]) -> dict[str, str]:
    return {a.id: overrides.get(a.id, a.key) for a in ACTIONS}


def textual_keymap(overrides: Mapping[str, str]) -> dict[str, str]:
    return {PREFIX + k: v for k, v in overrides.items()}
