"""Sharded parameters (FSDP2 ``fully_shard`` DTensors, DeepSpeed ZeRO-3): what the tracker needs to know.

Under FSDP2 every rank holds a shard of each parameter and of its (already reduced) gradient. The
tracker keeps state for the local shard only, so its memory per rank falls with the world size;
counts are summed across the shard group at measuring time, and full masks are gathered for export.

Under DeepSpeed ZeRO-3 the module's parameter is an empty placeholder; the rank's partition of the
stored value is ``param.ds_tensor``: a flat run of ``ceil(ds_numel / world)`` elements of the flattened
parameter starting at ``rank × partition size``, padded at the end (on the last rank(s)). The "local
shard" here is the partition's valid (unpadded) part; the gradient partition has the same layout.

Under DDP and ZeRO-0/1/2 parameters are plain tensors, replicated, and nothing here applies.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist


def is_zero3(tensor: torch.Tensor) -> bool:
    """True for a DeepSpeed ZeRO-3 partitioned parameter (its partition in ``ds_tensor``)."""
    return getattr(tensor, "ds_tensor", None) is not None and hasattr(tensor, "ds_numel")


def _zero3_partition(param: torch.Tensor) -> tuple[int, int, int]:
    """``(partition size, start in the flattened parameter, valid elements)`` of this rank's partition."""
    size = param.ds_tensor.numel()
    start = size * dist.get_rank(group=param.ds_process_group)
    return size, start, max(0, min(size, param.ds_numel - start))


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor with at least one ``Shard`` placement, or a ZeRO-3 partitioned parameter."""
    if is_zero3(tensor):
        return True
    placements = getattr(tensor, "placements", None)
    return placements is not None and any(p.is_shard() for p in placements)


def local(tensor: torch.Tensor) -> torch.Tensor:
    """The locally held part of a tensor: a DTensor's shard, the valid part of a ZeRO-3 parameter's
    partition (flat, read afresh from ``ds_tensor`` on every call), else the tensor itself."""
    if is_zero3(tensor):
        return tensor.ds_tensor.reshape(-1).narrow(0, 0, _zero3_partition(tensor)[2])
    to_local = getattr(tensor, "to_local", None)
    return to_local() if callable(to_local) else tensor


def full_shape(param: torch.Tensor) -> tuple[int, ...]:
    """The full parameter's shape (a ZeRO-3 placeholder's own ``shape`` is empty)."""
    return tuple(param.ds_shape) if is_zero3(param) else tuple(param.shape)


def shard_group(param: torch.Tensor) -> dist.ProcessGroup:
    """The process group over which ``param`` is sharded (its mesh dimension with a Shard placement, or
    a ZeRO-3 parameter's partition group)."""
    if is_zero3(param):
        return param.ds_process_group
    mesh = param.device_mesh
    dims = [i for i, p in enumerate(param.placements) if p.is_shard()]
    return mesh.get_group(mesh_dim=dims[0])


def flat_offset(param: torch.Tensor) -> int:
    """Index, in the flattened full parameter, of the local shard's first element.

    Exact for row-wise sharding (``Shard(0)``, FSDP2's default), where the local shard is a contiguous
    run of the flattened parameter; 0 for anything else (the sampled subset then differs from a
    single-process run's, which only matters for ``cancellation="sampled"``). Exact for ZeRO-3.
    """
    if is_zero3(param):
        return _zero3_partition(param)[1]
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
    if is_zero3(param):
        size, _, valid = _zero3_partition(param)
        padded = torch.zeros(size, dtype=torch.uint8, device=local_mask.device)  # gloo cannot all-gather bool
        padded[:valid] = local_mask.reshape(-1)
        group = param.ds_process_group
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(parts, padded, group=group)
        return torch.cat(parts)[:param.ds_numel].reshape(param.ds_shape).bool()
    from torch.distributed.tensor import DTensor

    shard = local_mask.reshape(local(param).shape).to(torch.uint8)  # gloo cannot all-gather bool
    full = DTensor.from_local(shard, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride()).full_tensor()
    return full.bool()
