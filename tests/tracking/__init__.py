"""The tracker in one process: its fold against independent computations, the CPU NumPy and torch paths,
state and resharding, split tracking."""
