"""Measuring: the tracker and its per-parameter state, and the summaries computed from it.

:class:`~.tracker.GradTracker` (with its settings :class:`~.config.TrackerConfig`) folds each step into
per-parameter state declared once in :mod:`.state`; :mod:`.persistence` saves and restores it (re-cut by
:mod:`.reshard` for another layout); the kernels that do the work, torch and CPU NumPy, live in
:mod:`.kernels`, chosen by ``backend=``; sharded parameters in :mod:`.sharding`, split tracking in
:mod:`.split`; and :func:`~.summary.summarize`. Knows nothing of transformers, trainers or trackers.
May import :mod:`gradtrace.formats` and :mod:`gradtrace.anatomy`.
"""
