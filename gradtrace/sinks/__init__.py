"""Where summaries go besides the local run log: one module per tracker behind one small protocol
(:class:`~.base.Sink`). Today: Weights & Biases (:mod:`.wandb`).

A sink only formats summaries it is handed; each tracker's package is imported where it is used, so a
missing one costs nothing. May import :mod:`gradtrace.formats`, :mod:`gradtrace.anatomy` and
:mod:`gradtrace.views` (for rendered figures).
"""
