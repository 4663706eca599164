"""Where a parameter sits in the model, from its name: layer, module kind, and grouping by them.

The single source of grouping for everything downstream (summaries, run log, W&B, report, watch,
``diff``, ``overlap``). May import :mod:`gradtrace.formats` only.
"""
