"""The run directory: what may be written where, checkpoints, the lock, run.json, reading runs back."""
