"""The weight-sync budget: what each optimizer step (or each ``sync_every``-step window) changes in the
weights an inference engine receives, bitwise in the sync dtype, and the bytes of that patch per encoding.

It sits beside :mod:`gradtrace.tracking` and may import only :mod:`gradtrace.formats` and
:mod:`gradtrace.anatomy`. The integrations call a :class:`SyncObserver` after each optimizer step.

Two quantities are kept apart everywhere: ``step_changed`` (the latest step, per step) and
``window_changed`` (since the last sync) are the per-step / per-window fractions an RL weight sync sends;
the tracker's ``update_sparsity`` is cumulative since the start of training.
"""

from gradtrace.sync.observer import SyncObserver
from gradtrace.sync.patch import ENCODINGS, Patch, TensorPatch, diff_weights

__all__ = ["ENCODINGS", "Patch", "SyncObserver", "TensorPatch", "diff_weights"]
