"""Measuring: the tracker and its per-parameter state, and the summaries computed from it.

:class:`~.tracker.GradTracker` (with its settings :class:`~.config.TrackerConfig`, its state declared
once in :mod:`.state`, sharded parameters in :mod:`.sharding` and the CPU fast paths in
:mod:`.cpu_scan` / :mod:`.cpu_measure`) and :func:`~.summary.summarize`. Knows nothing of
transformers, trainers or trackers. May import :mod:`gradtrace.formats` and :mod:`gradtrace.anatomy`.
"""
