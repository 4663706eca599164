"""The end of a worker script: every rank gets here, then every process group is destroyed and its
threads joined while the interpreter is still whole.

Why: ``dist.destroy_process_group()`` only drops torch's own references to the groups. A group that
something else still holds lives on, with its gloo threads (``pt_gloo_runloop``, ``gloo_tcp_loop``),
into interpreter finalization. Under ZeRO-3 (with or without CPU offload) that is always so:
``deepspeed.runtime.zero.parameter_offload.FWD_MODULE_STACK``, a module-level list, keeps the root module
(and through its hooks the engine, through ``ds_process_group`` the groups) alive, and even with that
list cleared and the engine destroyed, the engine stays reachable by a path not found (measured in
``trainer_deepspeed.py``'s ZeRO-3 offload run: 2 groups, 4 ``pt_gloo_runloop`` and 2 ``gloo_tcp_loop``
threads per rank left after ``destroy_process_group``). In
finalization a thread that wants the GIL back is ended with pthread_exit, a forced unwind that aborts
through any C++ destructor in its way: "terminate called without an active exception" (SIGABRT), after
the rank's work is written, as seen in CI. So the end is explicit and in a fixed order: barrier;
DeepSpeed's engines destroyed, its module stack cleared, its group references released
(``deepspeed.comm.destroy_process_group``); torch's groups destroyed; garbage collected. If group threads
are still running then, the exit handlers run and the process ends without finalization.

Call it after ``main()`` has returned, so that main's locals (trainer, callback, model) are gone.
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
