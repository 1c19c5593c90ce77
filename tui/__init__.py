"""The terminal chat UI (Textual): `chatcore chat`. Talks to context's session API only; never
imports torch or redis itself. The model loads in a background worker after the first paint."""
