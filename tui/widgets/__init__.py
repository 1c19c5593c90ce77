"""The chat UI's widgets."""
