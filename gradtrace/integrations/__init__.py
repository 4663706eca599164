"""Thin adapters that feed the tracker from a training loop.

:mod:`.session` (a traced run: tracker, run log, sinks, exports, checkpoints) and
:mod:`.run_info` are shared by the adapters: the transformers / TRL callback (:mod:`.trainer`), the
plain PyTorch loop (:mod:`.plain_loop`) and the DeepSpeed engine hook (:mod:`.deepspeed`). transformers
and DeepSpeed are imported only by the modules that adapt to them. May import every room below:
:mod:`gradtrace.formats`, :mod:`gradtrace.anatomy`, :mod:`gradtrace.tracking`, :mod:`gradtrace.sinks`.
"""
