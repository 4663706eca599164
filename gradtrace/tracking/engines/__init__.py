"""Who keeps which part of each parameter: one module per training engine, behind one small base.

Each engine builds, once per parameter (again when the parameter set changes), a frozen
:class:`~.base.Placement`: the part of the flattened parameter this rank keeps state for, where it starts,
whether its counts enter the sums across ranks, where its sampled elements start. The tracker's per-step
path then reads attributes, never asks again. :mod:`.local` (one process; parameters sharded by FSDP2 /
DTensor / HSDP, each rank keeping its own shard), :mod:`.zero3` (ZeRO-3 partitions), :mod:`.split` (replicated parameters under
DDP / ZeRO-0, the tracking divided among the ranks) and :mod:`.partitions` (ZeRO-1/2: each rank keeps the
fragments of its optimizer partition). :mod:`.choice` says which one a tracker takes. Adding an engine is one
module here, its test, and its place in that choice.
"""
