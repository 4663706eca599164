"""Sharded parameters (FSDP2 ``fully_shard``: DTensors): what the tracker needs to know about them.

Under FSDP2 every rank holds a shard of each parameter and of its (already reduced) gradient. The
tracker keeps state for the local shard only, so its memory per rank falls with the world size;
counts are summed across the shard group at measuring time, and full masks are gathered for export.
Under DDP parameters are plain tensors, replicated, and nothing here applies.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor with at least one ``Shard`` placement."""
    placements = getattr(tensor, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The locally held part of a tensor: a DTensor's shard, else the tensor itself."""
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def shard_group(param: torch.Tensor) -> dist.ProcessGroup:
    """The process group over which ``param`` is sharded (its mesh dimension with a Shard placement)."""
    mesh = param.device_mesh
    dims = [i for i, p in enumerate(param.placements) if p.is_shard()]
    return mesh.get_group(mesh_dim=dims[0])


def flat_offset(param: torch.Tensor) -> int:
    """Index, in the flattened full parameter, of the local shard's first element.

    Exact for row-wise sharding (``Shard(0)``, FSDP2's default), where the local shard is a contiguous
    run of the flattened parameter; 0 for anything else (the sampled subset then differs from a
    single-process run's, which only matters for ``cancellation="sampled"``).
    """
    if not is_sharded(param):
        return 0
    if any(p.is_shard() and p.dim != 0 for p in param.placements):
        return 0
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    _, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return offset[0] * math.prod(param.shape[1:]) if offset else 0


def sample_start(param: torch.Tensor, stride: int) -> int:
    """First local index whose global flat index is a multiple of ``stride``.

    Sampling every ``stride``-th element of the *full* parameter keeps the sampled set, and so every
    count derived from it, identical to a single-process run's.
    """
    return (-flat_offset(param)) % stride


def gather_full(local_mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Assemble a boolean mask laid out like ``param``'s local shard into the full parameter's shape.

    A collective: every rank of the shard group must call it, in the same order.
    """
    from torch.distributed.tensor import DTensor

    shard = local_mask.reshape(local(param).shape).to(torch.uint8)  # gloo cannot all-gather bool
    full = DTensor.from_local(shard, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride()).full_tensor()
    return full.bool()
