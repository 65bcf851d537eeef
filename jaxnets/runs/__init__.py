"""A run's bookkeeping on disk: its work directory and lock, checkpoints, logs (JSONL and
TensorBoard), configs as flags, warm start from another run."""
