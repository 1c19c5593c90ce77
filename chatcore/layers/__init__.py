"""Building blocks shared by the model families: norms, rotary tables, the attention entry point."""
