"""The math: losses, metrics, optimisers, regularisers, EMA and gradient accumulation, with
the argument rules and types they share. No devices, no files."""
