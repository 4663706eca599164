"""The end of every worker script: every rank gets here, then every process group is destroyed and its
threads joined while the interpreter is still whole, and never by DDP's reducer.

Why (found with ``py-spy dump --native`` on hung ranks; docs/distributed.md, "Ending a distributed run"):
gloo's worker thread releases a finished collective's tensors after the call has returned, and releasing
a tensor that Python created needs the GIL. The group's destructor joins that thread. When the destructor
runs from a Python object's deallocation that keeps the GIL, it waits for a thread that waits for the GIL:
a deadlock. DDP's ``Reducer`` is such an object (its binding destroys the group without releasing the
GIL, pytorch/pytorch#56297); freed at ``main()``'s return after ``dist.destroy_process_group()`` dropped
torch's own references, it destroys the group, and if the rank's last collective ended a few
milliseconds before (the export's broadcast on a rank that then writes nothing), the rank hangs. If the
thread reaches the GIL after interpreter finalization has begun instead, Python ends it with
``pthread_exit``, a forced unwind through a ``noexcept`` destructor: "terminate called without an active
exception" (SIGABRT). ZeRO-3 keeps its groups alive into finalization through
``deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK`` (a module-level list holding the root
module, through its hooks the engine, through ``ds_process_group`` the groups).

So the end is explicit and in a fixed order, after ``main()`` has returned (its DDP wrapper, trainer and
model are gone, while torch still holds the group: the reducer's release is not the last): barrier;
DeepSpeed's engines destroyed, its module stack cleared, its group references released
(``deepspeed.comm.destroy_process_group``); torch's groups destroyed (torch's own ``ProcessGroup``
binding releases the GIL in its destructor); garbage collected. If group threads are still running then
(something outside our reach still holds a group), the exit handlers run and the process ends without
finalization.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys

import torch.distributed as dist

# the names torch and gloo give their threads (pthread_setname_np): a group's worker and transport loops
GROUP_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


def group_threads() -> list[str]:
    """The names of this process's threads that belong to a process group (read from ``/proc``)."""
    names = []
    for tid in os.listdir("/proc/self/task"):
        try:
            with open(f"/proc/self/task/{tid}/comm") as stream:
                name = stream.read().strip()
        except OSError:  # the thread ended meanwhile
            continue
        if name in GROUP_THREADS:
            names.append(name)
    return sorted(names)


def end_process_group() -> None:
    """Barrier, then destroy every process group (DeepSpeed's too); a process whose groups still run
    then ends without interpreter finalization (nothing when no group was started)."""
    if not (dist.is_available() and dist.is_initialized()):
        return
    dist.barrier()
    deepspeed = sys.modules.get("deepspeed")
    gc.collect()  # engines only reachable through cycles (the Trainer's) are found and destroyed next
    if deepspeed is not None:
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.runtime.zero import parameter_offload

        for engine in [o for o in gc.get_objects() if isinstance(o, DeepSpeedEngine)]:
            engine.destroy()  # the ZeRO optimizer's hooks and its parameter coordinator
        # ZeRO-3 pushes each engine's root module onto this module-level stack and never pops it: the
        # model, through its hooks the engine, and through ds_process_group the groups, would live on
        parameter_offload.FWD_MODULE_STACK.clear()
    if deepspeed is not None and deepspeed.comm.is_initialized():
        deepspeed.comm.destroy_process_group()  # torch's, and DeepSpeed's references to its groups
    else:
        dist.destroy_process_group()
    gc.collect()
    if group_threads():
        # Something outside our reach still holds a group (under ZeRO-3, the engine): its threads would meet interpreter finalization, the phase in which a
        # thread that wants the GIL back is ended by pthread_exit (a forced unwind through a C++
        # destructor: std::terminate). The work is written; run the exit handlers (W&B, logging) and end
        # here, skipping only finalization.
        sys.stdout.flush()
        sys.stderr.flush()
        atexit._run_exitfuncs()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
