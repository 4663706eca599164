"""Where summaries go besides the local run log: one module per tracker behind one small protocol
(:class:`~.base.Sink`): W&B (:mod:`.wandb`), TensorBoard, MLflow, trackio; what they all show is decided once
in :mod:`.payload`, and :mod:`.select` builds them from a trainer's ``report_to``.

A sink only formats summaries it is handed; each tracker's package is imported where it is used, so a
missing one costs nothing. May import :mod:`gradtrace.formats`, :mod:`gradtrace.anatomy` and
:mod:`gradtrace.views` (for rendered figures).
"""
