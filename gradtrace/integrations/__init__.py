"""Thin adapters that feed the tracker from a training loop.

The adapters, the transformers / TRL callback (:mod:`.trainer`) and the plain PyTorch loop
(:mod:`.plain_loop`), share everything but their events: the gradient source of the run's engine
(:mod:`.gradient_sources`: a torch optimizer's step, or a DeepSpeed engine's, :mod:`.deepspeed`), how a
run is opened (:mod:`.opening`: tracker, run info, sinks, :mod:`.session`), and one failure policy
(:mod:`.failures`). transformers and DeepSpeed are imported only by the modules that adapt to them. May
import every room below: :mod:`gradtrace.formats`, :mod:`gradtrace.anatomy`, :mod:`gradtrace.tracking`,
:mod:`gradtrace.sync`, :mod:`gradtrace.sinks`.
"""
