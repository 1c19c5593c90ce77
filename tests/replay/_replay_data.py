"""Where the shipped replay conversations and golden reports live (a helper module: conftest names
collide across test folders)."""

from pathlib import Path

DATA = Path(__file__).resolve().parent.parent / "data" / "replay"
