"""gradtrace's collectives, whose tensors are kept alive a little longer than the call.

Why: a gloo collective's tensors are released by gloo's worker thread once the work is done, shortly after
the call has returned. If the caller has already dropped its tensor by then, releasing the last reference
frees a Python object, which needs the GIL, on that thread. Near the end of a process (the last export
of a rank that writes nothing, just before ``destroy_process_group()`` and exit) the main thread may by
then be finalizing the interpreter, holding the GIL while it destroys the group (held until then by DDP's
reducer) and joins that very thread: a deadlock, or, when the thread reaches the GIL after finalization
has begun, a ``pthread_exit`` through a ``noexcept`` destructor ("terminate called without an active
exception", SIGABRT). Both were seen in CI; docs/distributed.md, "Ending a distributed run".

Keeping a reference to the last few tensors here makes the worker's release a plain decrement; the main
thread frees them later (the next collectives push them out, or the interpreter at exit), holding the GIL.
What is kept: the last :data:`KEPT` calls' tensors, which are small (flags, count tables) or masks the
caller holds anyway.
"""

from __future__ import annotations

from collections import deque

import torch
import torch.distributed as dist

KEPT = 8
_recent: deque[object] = deque(maxlen=KEPT)


def all_reduce(tensor: torch.Tensor, op: dist.ReduceOp = dist.ReduceOp.SUM, group: dist.ProcessGroup | None = None) -> None:
    dist.all_reduce(tensor, op=op, group=group)
    _recent.append(tensor)


def broadcast(tensor: torch.Tensor, src: int, group: dist.ProcessGroup | None = None) -> None:
    dist.broadcast(tensor, src=src, group=group)
    _recent.append(tensor)


def all_gather(outputs: list[torch.Tensor], tensor: torch.Tensor, group: dist.ProcessGroup | None = None) -> None:
    dist.all_gather(outputs, tensor, group=group)
    _recent.append((list(outputs), tensor))
