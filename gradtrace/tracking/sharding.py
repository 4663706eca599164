"""Sharded parameters (FSDP2 ``fully_shard`` DTensors, DeepSpeed ZeRO-3): what the tracker needs to know.

Under FSDP2 every rank holds a shard of each parameter and of its (already reduced) gradient. The
tracker keeps state for the local shard only, so its memory per rank falls with the world size;
counts are summed across the shard group at measuring time, and full masks are gathered for export.

Under DeepSpeed ZeRO-3 the module's parameter is an empty placeholder; the rank's partition of the
stored value is ``param.ds_tensor``: a flat run of ``ceil(ds_numel / world)`` elements of the flattened
parameter starting at ``rank × partition size``, padded at the end (on the last rank(s)). The "local
shard" here is the partition's valid (unpadded) part; the gradient partition has the same layout.

Under DDP and ZeRO-0/1/2 parameters are plain tensors, replicated, and nothing here applies; the
tracker may still divide their tracking among the ranks (:mod:`gradtrace.tracking.split`), summing the
counts over the same kind of :func:`reduction_group` (the whole world).

A sharded run may also hold parameters that every rank holds whole (plain tensors: FSDP2's
``ignored_params``, ``replicate()``'d submodules; ``Replicate`` DTensors), and 2-D meshes (HSDP
``[Replicate(), Shard(0)]``, FSDP + TP ``[Shard(0), Shard(1)]``) shard a parameter over some mesh
dimensions and replicate it over others. One all-reduce over the whole :func:`reduction_group` still
sums every parameter's counts exactly once: a rank adds its local counts of a parameter only if it is
the first of the ranks holding copies of the same local part (:func:`counts_here`).
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


def _splits(placement) -> bool:
    """Whether a placement splits the tensor across its mesh dimension: ``Shard``, and also FSDP + TP's
    ``_StridedShard``, whose ``is_shard()`` is False."""
    return not placement.is_replicate() and not placement.is_partial()


def is_sharded(tensor: torch.Tensor) -> bool:
    """True for a DTensor with at least one ``Shard`` placement, or a ZeRO-3 partitioned parameter."""
    if is_zero3(tensor):
        return True
    placements = getattr(tensor, "placements", None)
    return placements is not None and any(_splits(p) for p in placements)


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


def check_placements(name: str, param: torch.Tensor) -> None:
    """Refuse a parameter whose local tensors do not each hold a part of its value (``Partial``)."""
    placements = getattr(param, "placements", None) or ()
    if any(p.is_partial() for p in placements):
        raise ValueError(f"parameter {name!r} has a Partial placement ({list(placements)}): its local tensors "
                         "are summands, not parts of the value, so masks of them mean nothing; redistribute it "
                         "to Shard/Replicate placements before tracking")


def _mesh_ranks(mesh) -> list[int]:
    return sorted(int(r) for r in mesh.mesh.flatten().tolist())


def reduction_group(sharded: list[torch.Tensor]) -> dist.ProcessGroup:
    """The one process group over which a sharded run's counts are summed and its step flags combined.

    ZeRO-3: the partition group. FSDP2: the mesh dimension's group when every sharded parameter lives on
    the same 1-D mesh (so a mesh over part of the world works as before), else the whole world, which
    every mesh must then span (2-D meshes; several meshes over the same ranks).
    """
    if any(is_zero3(p) for p in sharded):
        return sharded[0].ds_process_group
    meshes = {id(p.device_mesh): p.device_mesh for p in sharded}
    if len(meshes) == 1:
        (mesh,) = meshes.values()
        if mesh.ndim == 1:
            return mesh.get_group(mesh_dim=0)
    world = list(range(dist.get_world_size()))
    spans = {tuple(_mesh_ranks(mesh)) for mesh in meshes.values()}
    if spans != {tuple(world)}:
        raise ValueError("gradtrace can combine counts of parameters sharded over several or multi-dimensional "
                         "device meshes only when each mesh spans all ranks of the job; these span "
                         f"{sorted(spans)} of {len(world)} ranks")
    return dist.group.WORLD


def counts_here(param: torch.Tensor, group: dist.ProcessGroup) -> bool:
    """Whether this rank's local counts of ``param`` enter the sum across ``group``.

    A ZeRO-3 partition is this rank's own: yes. A DTensor: yes on the ranks whose mesh coordinate is 0 on
    every dimension that replicates it, i.e. once per distinct local part (HSDP: the first replica of each
    shard). A plain tensor is held whole by every rank: only on the group's first rank.
    """
    if is_zero3(param):
        return True
    placements = getattr(param, "placements", None)
    if placements is None:
        return dist.get_rank(group) == 0
    coordinate = param.device_mesh.get_coordinate()
    if coordinate is None:  # this rank holds no part of it
        return False
    return all(c == 0 for c, p in zip(coordinate, placements, strict=True) if not _splits(p))


def _local_box(param: torch.Tensor) -> tuple[tuple[int, ...], tuple[int, ...]] | None:
    """``(local shape, global offset)`` of a DTensor whose local part is a box of the full tensor (only
    ``Shard``/``Replicate`` placements), else ``None`` (e.g. FSDP + TP's strided shards)."""
    from torch.distributed.tensor import Replicate, Shard

    if not all(type(p) in (Shard, Replicate) for p in param.placements):
        return None
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(param.shape, param.device_mesh, param.placements)
    return tuple(shape), tuple(offset)


def _is_contiguous_run(local_shape: tuple[int, ...], full_shape: tuple[int, ...]) -> bool:
    """Whether a box of these sizes is one contiguous run of the flattened (row-major) full tensor: it
    holds one index of every dimension before the last one it cuts."""
    cut = [d for d, (n, full) in enumerate(zip(local_shape, full_shape, strict=True)) if n != full]
    return not cut or all(local_shape[d] <= 1 for d in range(cut[-1]))


def flat_offset(param: torch.Tensor) -> int:
    """Index, in the flattened full parameter, of the local shard's first element.

    Exact whenever the local shard is a contiguous run of the flattened parameter (``Shard(0)``, FSDP2's
    default, on any mesh; ZeRO-3); 0 otherwise, where :func:`sample_index` gives the sampled elements.
    """
    if is_zero3(param):
        return _zero3_partition(param)[1]
    if not is_sharded(param):
        return 0
    box = _local_box(param)
    if box is None or not _is_contiguous_run(box[0], tuple(param.shape)) or not box[1]:
        return 0
    strides = [math.prod(param.shape[d + 1:]) for d in range(len(param.shape))]
    return sum(o * s for o, s in zip(box[1], strides, strict=True))


def sample_start(param: torch.Tensor, stride: int) -> int:
    """First local index whose global flat index is a multiple of ``stride``.

    Sampling every ``stride``-th element of the *full* parameter keeps the sampled set, and so every
    count derived from it, identical to a single-process run's.
    """
    return (-flat_offset(param)) % stride


def sample_index(param: torch.Tensor, stride: int) -> torch.Tensor | None:
    """Local flat indices of the elements whose global flat index is a multiple of ``stride``, for a shard
    that is not a contiguous run of the full parameter (``Shard(1)``, ``[Shard(0), Shard(1)]``); ``None``
    when :func:`sample_start` describes them (or, for strided FSDP + TP shards, approximates them).

    Built row by row of the local box (the last dimension is a contiguous run of the full tensor), so it
    costs the index itself (int64 per sampled element, ``8 / stride`` bytes per element) plus one value per
    local row, never one per element.
    """
    if stride == 1 or is_zero3(param) or not is_sharded(param):
        return None
    box = _local_box(param)
    if box is None or _is_contiguous_run(box[0], tuple(param.shape)):
        return None
    local_shape, offset = box
    full = tuple(param.shape)
    device = local(param).device
    strides = [math.prod(full[d + 1:]) for d in range(len(full))]
    # global flat index of each local row's first element
    rows = torch.zeros((), dtype=torch.int64)
    for d in range(len(full) - 1):
        positions = (torch.arange(local_shape[d], dtype=torch.int64) + offset[d]) * strides[d]
        rows = (rows.unsqueeze(-1) + positions).reshape(-1)
    rows = rows.reshape(-1) + offset[-1]
    width = local_shape[-1]
    first = (-rows) % stride  # in each row, the first column whose global index is a multiple of stride
    taken = ((width - first).clamp_min(0) + stride - 1) // stride
    row_starts = torch.arange(rows.numel(), dtype=torch.int64) * width + first
    within = torch.arange(int(taken.sum()), dtype=torch.int64) - torch.repeat_interleave(taken.cumsum(0) - taken, taken)
    return (torch.repeat_interleave(row_starts, taken) + within * stride).to(device)


def gather_full(local_mask: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """Assemble a boolean mask laid out like ``param``'s local shard into the full parameter's shape.

    A collective: every rank of the shard group must call it, in the same order.
    """
    if is_zero3(param):
        size, _, valid = _zero3_partition(param)
        group = param.ds_process_group
        device = collective_device(group, local_mask.device)  # an offloaded partition is on the CPU
        padded = torch.zeros(size, dtype=torch.uint8, device=device)  # gloo cannot all-gather bool
        padded[:valid] = local_mask.reshape(-1)
        parts = [torch.empty_like(padded) for _ in range(dist.get_world_size(group=group))]
        dist.all_gather(parts, padded, group=group)
        return torch.cat(parts)[:param.ds_numel].reshape(param.ds_shape).bool()
    from torch.distributed.tensor import DTensor

    # on 2-D meshes (HSDP, FSDP + TP) full_tensor() gathers over every mesh dimension, as it must
    shard = local_mask.reshape(local(param).shape).to(torch.uint8)  # gloo cannot all-gather bool
    if shard.device.type != param.device_mesh.device_type:  # FSDP2 CPU offload on a CUDA mesh
        shard = shard.to(param.device_mesh.device_type)
    full = DTensor.from_local(shard, param.device_mesh, param.placements, run_check=False,
                              shape=param.shape, stride=param.stride()).full_tensor()
    return full.bool()


def collective_device(group: dist.ProcessGroup, default: torch.device) -> torch.device:
    """Where tensors for collectives over ``group`` must be: the current CUDA device under NCCL (which
    takes no CPU tensors: a CPU-offloaded model's state lives on the CPU), else ``default``."""
    if "nccl" in str(dist.get_backend(group)).lower():
        return torch.device("cuda", torch.cuda.current_device())
    return default
