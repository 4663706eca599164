"""The end of a worker script: every rank gets here, then the process group is destroyed.

Left to interpreter exit, the group's backend threads can be torn down while still in use: a rank then
dies with "terminate called without an active exception" (SIGABRT) after its work is done and written,
as seen once in CI in a ZeRO-3 offload run. PyTorch asks for ``destroy_process_group()`` before exit.
"""

from __future__ import annotations

import torch.distributed as dist


def end_process_group() -> None:
    """Barrier, then destroy the default process group (nothing when none was started)."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
