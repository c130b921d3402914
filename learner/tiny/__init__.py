"""The built-in tiny model: its BPE tokenizer, the deterministic model built from a config, and
the supervised warm-up the built-in tasks start from."""
