"""Training checkpoints on torch Distributed Checkpoint: folders and atomic, optionally asynchronous saves
(state.py), what a run saves and how any layout reads it back (train_state.py), and a metadata reader that
runs no code from any file (safe_reader.py)."""
