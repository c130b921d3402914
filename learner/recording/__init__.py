"""Recording and replay: the append-only store of accepted messages, the hub wrapper that
writes it, replay from disk and `python -m learner.recording.inspect`."""
