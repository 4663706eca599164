"""Post-hoc update sparsity between two checkpoints, streamed one tensor pair at a time.

``sparsity(θ₀, θ₁) = 1 − ‖θ₁ − θ₀‖₀ / n`` (Mukherjee et al., arXiv 2505.11711, §2.2) is reported under
several *criteria* for "this element is unchanged":

- an **absolute tolerance** ``tol``: unchanged iff ``|θ₁ − θ₀| ≤ tol`` with the delta computed in the
  stored dtype, exactly like the paper's ``isclose(delta, 0, atol=tol)`` (the tolerance is rounded to
  that dtype too, and a NaN delta counts as changed);
- tolerance ``0`` is **bit-exact** equality of the stored values (so ``-0.0`` vs ``+0.0`` is a change
  and two identical NaNs are not);
- a **relative tolerance** ``η`` (Zhu et al., arXiv 2511.08567): unchanged iff
  ``|ŵ − w| ≤ η·max(|w|, |ŵ|)``, computed in float32.

Checkpoints are Hugging Face model folders (a single ``*.safetensors`` file, or shards listed in
``model.safetensors.index.json``), raw ``.safetensors`` files, or hub repos ``org/name[@revision]``
streamed with HTTP range reads (:mod:`gradtrace.masks.hub`). Each is a :class:`TensorSource`
(:mod:`.sources`, whose headers are checked alike wherever they come from), and one comparison loop
reads them all. Only one tensor pair is resident at a time (memory ≈ twice the
largest tensor plus a few fixed-size chunks; from the hub, plus the next pair read ahead), never two
whole models. FP8 checkpoints in the DeepSeek-V3 layout are compared dequantized (:mod:`.fp8`); an
interrupted diff can resume from its last finished tensor (:mod:`.resume`).
Names, shapes and dtypes must match; any mismatch raises :class:`CheckpointDiffError` naming both
checkpoints and the tensor. Non-float tensors (integer buffers) are skipped with a note.

The bitwise "changed" mask can be written as kind ``"update"`` of a gradtrace masks file, so post-hoc
and live masks are directly comparable (``gradtrace overlap``).
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from gradtrace.anatomy.experts import ExpertLayout, config_expert_counts, expert_layout
from gradtrace.anatomy.grouping import by_expert, by_kind, by_layer, by_tower, total
from gradtrace.formats.bitpack import pack_bits
from gradtrace.formats.dtypes import INT_VIEW, TORCH_NAME
from gradtrace.formats.masks_file import PackedMask, save_masks
from gradtrace.formats.output_path import unwritable_reason
from gradtrace.masks.fp8 import (
    FP8_DTYPES,
    SCALE_SUFFIX,
    Fp8Layout,
    QuantizationError,
    arithmetic_dtype,
    check_scale,
    dequantize,
    fp8_layout,
)
from gradtrace.masks.resume import ResumeState, ResumeStateError
from gradtrace.masks.sources import (  # defined here before: callers still import them from here
    INDEX_NAME,  # noqa: F401
    CheckpointDiffError,
    LocalSource,
    TensorSource,
    TensorSpec,
    checkpoint_index,  # noqa: F401
)

DEFAULT_TOLERANCES: tuple[str, ...] = ("0", "1e-5")

# Elements per chunk: bounds the temporaries of one comparison (~30 MB for 1 M elements) independently of
# the tensor size. A multiple of 8 so every chunk but the last packs into whole bytes.
CHUNK_ELEMENTS = 1 << 20

# Same-width integer views for bitwise comparison, by element size in bytes.


@dataclass(frozen=True)
class Criterion:
    """One definition of "unchanged": an absolute tolerance (0 = bit-exact) or a relative one."""

    label: str  # as given by the user, e.g. "1e-5"; the key in the results
    value: float
    relative: bool = False

    @property
    def key(self) -> str:
        """Key of this criterion's count in the per-tensor count dicts."""
        return f"rel:{self.label}" if self.relative else f"abs:{self.label}"

    @property
    def mask_kind(self) -> str:
        """Masks-file kind of this criterion's "changed" mask, spelled like the live tracker's
        (``update_abs_1e-05``, ``update_rel_0.001``: ``%g`` of the value) so the two compare directly."""
        if not self.relative and self.value == 0:
            return "update"
        return f"update_rel_{self.value:g}" if self.relative else f"update_abs_{self.value:g}"


def make_criteria(
    tolerances: Sequence[float | str] = DEFAULT_TOLERANCES, relative: Sequence[float | str] = ()
) -> list[Criterion]:
    """Parse tolerances (strings keep their spelling as label; floats are formatted with ``%g``)."""
    criteria: list[Criterion] = []
    seen: set[str] = set()
    for values, is_relative in ((tolerances, False), (relative, True)):
        for raw in values:
            label = raw.strip() if isinstance(raw, str) else format(float(raw), "g")
            try:
                value = float(label)
            except ValueError as err:
                raise ValueError(f"tolerance {raw!r} is not a number") from err
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"tolerance {raw!r} must be a finite number >= 0")
            criterion = Criterion(label, value, is_relative)
            if criterion.key not in seen:
                seen.add(criterion.key)
                criteria.append(criterion)
    if not criteria:
        raise ValueError("at least one tolerance is needed")
    return criteria


# --------------------------------------------------------------------------------------------------
# Reading checkpoints


def open_source(ref: str | os.PathLike, *, device: str = "cpu", cache: bool = False,
                retries: int = 5, backoff: float = 1.0, timeout: float | None = None) -> TensorSource:
    """A local checkpoint when ``ref`` exists on disk, else a hub repo ``org/name[@revision]``.

    Hub repos are streamed (ranged reads, nothing written to disk) unless ``cache`` is set, which
    downloads through the Hugging Face cache; ``HF_HUB_OFFLINE=1`` reads the cache only. ``retries`` and
    ``backoff`` (seconds, doubled per retry) bound the retries of transient HTTP errors; ``timeout`` is how
    long (seconds) one request may wait for the server (``None``: the hub module's default, 60 s).
    """
    if not isinstance(ref, str) or Path(ref).exists():
        return LocalSource(ref, device=device)
    from gradtrace.masks import hub  # huggingface_hub is imported there, and only when a hub id is given

    parsed = hub.parse_hub_ref(ref)
    if parsed is None:
        return LocalSource(ref, device=device)  # raises "no such checkpoint"
    return hub.open_hub_source(parsed, device=device, cache=cache, retries=retries, backoff=backoff,
                               timeout=hub.DEFAULT_TIMEOUT if timeout is None else timeout)


class CheckpointPair:
    """Two checkpoints side by side; :meth:`load` and :meth:`stream` read one tensor pair at a time.

    The constructor checks names, shapes and dtypes from the headers alone, so a mismatch is reported
    before any data is read. FP8 checkpoints in the DeepSeek layout (:mod:`gradtrace.masks.fp8`) are
    compared dequantized: their ``*_scale_inv`` tensors are read with their weight and are not tensors
    of the pair. ``base`` and ``tuned`` are local paths or hub ids (see :func:`open_source`).
    """

    def __init__(self, base: str | os.PathLike, tuned: str | os.PathLike, *, allow_missing: bool = False,
                 device: str = "cpu", cache: bool = False, retries: int = 5, backoff: float = 1.0,
                 timeout: float | None = None):
        self.device = device
        self.sources = tuple(open_source(ref, device=device, cache=cache, retries=retries, backoff=backoff,
                                         timeout=timeout) for ref in (base, tuned))
        self.base, self.tuned = (s.label for s in self.sources)
        self.notes: list[str] = []
        all_specs = [s.specs() for s in self.sources]
        self.layout, self.scales = self._fp8(all_specs)
        scale_names = set(self.scales.values())
        names = [[n for n in specs if n not in scale_names] for specs in all_specs]
        only_base = [n for n in names[0] if n not in all_specs[1]]
        only_tuned = [n for n in names[1] if n not in all_specs[0]]
        if (only_base or only_tuned) and not allow_missing:
            detail = []
            if only_base:
                detail.append(f"{len(only_base)} only in {self.base} (e.g. {only_base[0]!r})")
            if only_tuned:
                detail.append(f"{len(only_tuned)} only in {self.tuned} (e.g. {only_tuned[0]!r})")
            raise CheckpointDiffError(f"{self.base} and {self.tuned} hold different tensors: "
                                      + "; ".join(detail) + " (allow_missing / --allow-missing skips them)")
        if only_base or only_tuned:
            self.notes.append(f"skipped {len(only_base)} tensors only in {self.base} and "
                              f"{len(only_tuned)} only in {self.tuned}")
        self.specs: list[TensorSpec] = []
        for name in names[0]:
            if name not in all_specs[1]:
                continue
            spec_a, spec_b = all_specs[0][name], all_specs[1][name]
            if spec_a.shape != spec_b.shape:
                raise CheckpointDiffError(f"tensor {name!r} has shape {list(spec_a.shape)} in {self.base} "
                                          f"but {list(spec_b.shape)} in {self.tuned}")
            if spec_a.dtype != spec_b.dtype:
                raise CheckpointDiffError(f"tensor {name!r} is {spec_a.dtype} in {self.base} but "
                                          f"{spec_b.dtype} in {self.tuned}; compare checkpoints saved in the "
                                          "same dtype")
            self.specs.append(spec_a)
        if self.scales:
            self.notes.append(f"{len(self.scales)} fp8 weights compared dequantized (fp8 value × its "
                              f"{self.layout.rows}×{self.layout.cols} block's scale_inv, in float64); their "
                              "scale tensors are part of them, not elements of their own")

    def _fp8(self, all_specs: list[dict[str, TensorSpec]]) -> tuple[Fp8Layout | None, dict[str, str]]:
        """The pair's fp8 layout and ``{weight: its scale tensor}``; errors name the checkpoint."""
        try:
            layouts = [fp8_layout(s.config(), s.label) for s in self.sources]
            if layouts[0] != layouts[1]:
                raise QuantizationError(f"{self.base} is quantized as {layouts[0]} but {self.tuned} as "
                                        f"{layouts[1]}; compare checkpoints stored the same way")
            layout = layouts[0]
            scales: dict[str, str] = {}
            if layout is None:
                return None, scales
            for source, specs in zip(self.sources, all_specs, strict=True):
                for name, spec in specs.items():
                    if spec.dtype not in FP8_DTYPES:
                        continue
                    scale = specs.get(name + SCALE_SUFFIX)
                    if scale is None:
                        raise QuantizationError(f"{source.label}: fp8 weight {name!r} has no {name + SCALE_SUFFIX!r}")
                    check_scale(layout, name, spec.shape, scale.shape, scale.dtype, source.label)
                    scales[name] = scale.name
            return layout, scales
        except QuantizationError as err:
            raise CheckpointDiffError(str(err)) from err

    def nbytes(self, spec: TensorSpec) -> int:
        """Bytes read for ``spec`` from both checkpoints (an fp8 weight's scales included)."""
        scale = self.scales.get(spec.name)
        extra = self.sources[0].specs()[scale].nbytes if scale else 0
        return 2 * (spec.nbytes + extra)

    @property
    def bytes_read(self) -> int:
        """Bytes of tensor data read so far from both checkpoints."""
        return sum(s.bytes_read for s in self.sources)

    def _load_side(self, side: int, name: str) -> torch.Tensor:
        source = self.sources[side]
        tensor = source.read(name)
        if name in self.scales:
            tensor = dequantize(tensor, source.read(self.scales[name]), self.layout)
        return tensor

    def load(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The tensor ``name`` from the base and from the tuned checkpoint (fp8: dequantized, float64)."""
        return self._load_side(0, name), self._load_side(1, name)

    def stream(self, specs: Sequence[TensorSpec]) -> Iterator[tuple[TensorSpec, torch.Tensor, torch.Tensor]]:
        """``(spec, base tensor, tuned tensor)`` for each of ``specs`` in order.

        From a streamed (hub) source the next pair is read, base and tuned concurrently, while the
        caller works on the current one: one pair ahead at most, so memory stays about two pairs.
        """
        if not any(s.streamed for s in self.sources):
            for spec in specs:
                yield (spec, *self.load(spec.name))
            return
        with ThreadPoolExecutor(max_workers=2, thread_name_prefix="gradtrace-read") as pool:
            def submit(spec: TensorSpec) -> tuple[Future, Future]:
                return pool.submit(self._load_side, 0, spec.name), pool.submit(self._load_side, 1, spec.name)

            pending = submit(specs[0]) if specs else None
            for i, spec in enumerate(specs):
                a, b = pending[0].result(), pending[1].result()
                pending = submit(specs[i + 1]) if i + 1 < len(specs) else None
                yield spec, a, b
                del a, b

    def close(self) -> None:
        """Nothing stays open between loads; kept so the pair can be used as a context manager."""

    def __enter__(self) -> CheckpointPair:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


# --------------------------------------------------------------------------------------------------
# Counting


def compare_tensors(
    base: torch.Tensor, tuned: torch.Tensor, criteria: Sequence[Criterion], *, with_masks: bool = False,
    slices: int | None = None, per_slice: list[dict[str, int]] | None = None,
) -> tuple[dict[str, int], dict[str, PackedMask]]:
    """Count unchanged elements of one tensor pair under each criterion, chunk by chunk.

    Returns ``({criterion.key: unchanged elements, "numel": n}, {mask kind: packed "changed" mask})``;
    the masks (bit-packed, 1 bit per element) are only built when ``with_masks`` is set, and then
    always include kind ``"update"`` (bitwise change) besides one per non-zero criterion.
    With ``slices`` (a fused MoE expert tensor: experts along dim 0), ``per_slice`` receives the same
    counts for each expert's slice, one dict per expert.
    """
    if base.shape != tuned.shape or base.dtype != tuned.dtype:
        raise ValueError(f"tensor pair differs: {base.dtype}{list(base.shape)} vs {tuned.dtype}{list(tuned.shape)}")
    flat_a, flat_b = base.reshape(-1), tuned.reshape(-1)
    n = flat_a.numel()
    int_view = INT_VIEW[flat_a.element_size()]
    # float8 has no arithmetic (nor type promotion): its deltas are taken in float32, exact for float8 values.
    delta_dtype = torch.float32 if flat_a.element_size() == 1 else flat_a.dtype
    rel_dtype = arithmetic_dtype(flat_a.dtype)
    counts = {"numel": n, **{c.key: 0 for c in criteria}}
    slice_numel = n // slices if slices else 0
    slice_totals = {c.key: torch.zeros(slices, dtype=torch.int64) for c in criteria} if slices else {}
    packed: dict[str, list[torch.Tensor]] = {}
    if with_masks:
        packed = {"update": [], **{c.mask_kind: [] for c in criteria}}

    # Scratch buffers reused by every chunk: fresh allocations per op would cost page faults and
    # allocator churn on every chunk of every tensor.
    size = min(n, CHUNK_ELEMENTS)

    def scratch(dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(size, dtype=dtype, device=flat_a.device)

    same_bits_buf, same_buf = scratch(torch.bool), scratch(torch.bool)
    delta_buf = scratch(delta_dtype) if any(not c.relative and c.value for c in criteria) else None
    if any(c.relative for c in criteria):
        r1, r2, r3 = scratch(rel_dtype), scratch(rel_dtype), scratch(rel_dtype)
        ra, rb = (None, None) if rel_dtype == flat_a.dtype else (scratch(rel_dtype), scratch(rel_dtype))

    for start in range(0, n, CHUNK_ELEMENTS):
        stop = min(n, start + CHUNK_ELEMENTS)
        m = stop - start
        a, b = flat_a[start:stop], flat_b[start:stop]
        # the expert of each element of the chunk (fused expert tensors only)
        expert = (torch.arange(start, stop, device=flat_a.device) // slice_numel).cpu() if slices else None
        same_bits = torch.eq(a.view(int_view), b.view(int_view), out=same_bits_buf[:m])
        delta_ready = False
        packed_now: set[str] = set()  # "1e-5" and "1e-05" are two criteria but one mask kind
        for c in criteria:
            if c.relative:
                a32 = a if ra is None else ra[:m].copy_(a)
                b32 = b if rb is None else rb[:m].copy_(b)
                diff = torch.sub(b32, a32, out=r1[:m]).abs_()
                scale = torch.maximum(torch.abs(a32, out=r2[:m]), torch.abs(b32, out=r3[:m]), out=r2[:m])
                same = torch.le(diff, scale.mul_(c.value), out=same_buf[:m])
            elif c.value == 0:
                same = same_bits
            else:
                delta = delta_buf[:m]
                if not delta_ready:
                    if delta_dtype == a.dtype:
                        torch.sub(b, a, out=delta)
                    else:
                        torch.sub(b.to(delta_dtype), a.to(delta_dtype), out=delta)
                    delta.abs_()
                    delta_ready = True
                # Same as torch.isclose(delta, 0, atol=tol): the scalar is rounded to the delta's dtype
                # and a NaN delta compares False (changed).
                same = torch.le(delta, c.value, out=same_buf[:m])
            counts[c.key] += int(torch.count_nonzero(same))
            if expert is not None:
                slice_totals[c.key].index_add_(0, expert, same.cpu().long())
            if with_masks and c.mask_kind != "update" and c.mask_kind not in packed_now:
                packed_now.add(c.mask_kind)
                packed[c.mask_kind].append(pack_bits(~same).cpu())
        if with_masks:
            packed["update"].append(pack_bits(~same_bits).cpu())
    if slices and per_slice is not None:
        per_slice.extend({"numel": slice_numel, **{k: int(v[e]) for k, v in slice_totals.items()}}
                         for e in range(slices))
    shape = tuple(base.shape)
    masks = {kind: PackedMask(torch.cat(chunks) if chunks else torch.zeros(0, dtype=torch.uint8), shape)
             for kind, chunks in packed.items()}
    return counts, masks


# --------------------------------------------------------------------------------------------------
# Results


def _ratio(num: float, den: float) -> float | None:
    return num / den if den else None


@dataclass
class DiffResult:
    """Per-tensor unchanged counts of a checkpoint diff, plus groupings and exports (JSON, CSV)."""

    base: str
    tuned: str
    criteria: list[Criterion]
    per_tensor: dict[str, dict[str, int]]  # name -> {"numel": n, criterion.key: unchanged elements}
    specs: dict[str, TensorSpec]
    skipped: list[dict[str, str]] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    bytes_read: int = 0  # tensor data read from both checkpoints by this run (not in the JSON: it varies)
    seconds: float = 0.0  # wall time of this run
    per_slice: dict[str, list[dict[str, int]]] = field(default_factory=dict)  # fused expert tensors, per expert
    listed_experts: dict[str, int] = field(default_factory=dict)  # per-expert module lists: name -> expert
    experts: ExpertLayout = field(default_factory=ExpertLayout)  # the checkpoint's anatomy: groups and kinds

    @property
    def tolerances(self) -> list[Criterion]:
        return [c for c in self.criteria if not c.relative]

    @property
    def relative(self) -> list[Criterion]:
        return [c for c in self.criteria if c.relative]

    def sparsity(self, counts: Mapping[str, float]) -> dict[str, dict[str, float | None]]:
        """``{"abs": {label: sparsity}, "rel": {label: sparsity}}`` for one count dict (fractions)."""
        n = counts.get("numel", 0)
        return {"abs": {c.label: _ratio(counts.get(c.key, 0), n) for c in self.tolerances},
                "rel": {c.label: _ratio(counts.get(c.key, 0), n) for c in self.relative}}

    def groups(self) -> dict[str, dict[str, dict[str, float]]]:
        """Summed counts: ``{"global": {"all": counts}, "layer", "kind", "tower", "expert", "matrix"}``
        (``"expert"``: ``"<layer>/<expert>"`` of MoE checkpoints, empty for dense ones)."""
        return {"global": {"all": total(self.per_tensor)},
                "layer": by_layer(self.per_tensor),
                "kind": by_kind(self.per_tensor, self.experts.kind),
                "tower": by_tower(self.per_tensor),
                "expert": by_expert(self.per_tensor, self.per_slice, self.listed_experts, self.experts.groups),
                "matrix": dict(self.per_tensor)}

    @property
    def numel(self) -> int:
        return int(total(self.per_tensor).get("numel", 0))

    def global_sparsity(self) -> dict[str, float | None]:
        """Update sparsity over all compared elements, per absolute tolerance label (fraction)."""
        return self.sparsity(total(self.per_tensor))["abs"]

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready summary; ``"global"`` maps each absolute tolerance label to the sparsity."""
        def entry(counts: Mapping[str, float], extra: dict[str, Any] | None = None) -> dict[str, Any]:
            s = self.sparsity(counts)
            out: dict[str, Any] = {"numel": int(counts.get("numel", 0)), **(extra or {}), "sparsity": s["abs"]}
            if self.relative:
                out["sparsity_relative"] = s["rel"]
            return out

        groups = self.groups()
        everything = groups["global"]["all"]
        result: dict[str, Any] = {
            "base": self.base,
            "tuned": self.tuned,
            "tolerances": [c.label for c in self.tolerances],
            "relative": [c.label for c in self.relative],
            "numel": int(everything.get("numel", 0)),
            "global": self.sparsity(everything)["abs"],
        }
        if self.relative:
            result["global_relative"] = self.sparsity(everything)["rel"]
        result["per_layer"] = {k: entry(v) for k, v in groups["layer"].items()}
        result["per_kind"] = {k: entry(v) for k, v in groups["kind"].items()}
        result["per_tower"] = {k: entry(v) for k, v in groups["tower"].items()}
        if groups["expert"]:
            result["per_expert"] = {k: entry(v) for k, v in groups["expert"].items()}
        result["per_matrix"] = {
            k: entry(v, {"shape": list(self.specs[k].shape), "dtype": self.specs[k].dtype})
            for k, v in groups["matrix"].items()}
        result["skipped"] = self.skipped
        result["notes"] = self.notes
        if self.experts.warnings:  # an unrecognised MoE layout, apart from the notes: views show it
            result["anatomy_warnings"] = list(self.experts.warnings)
        return result

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def to_csv(self) -> str:
        """One row per group (scope = global / layer / kind / matrix), one column per criterion."""
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(["scope", "name", "numel"] + [f"sparsity@{c.label}" for c in self.tolerances]
                        + [f"sparsity_rel@{c.label}" for c in self.relative])
        for scope, groups in self.groups().items():
            for name, counts in groups.items():
                s = self.sparsity(counts)
                values = list(s["abs"].values()) + list(s["rel"].values())
                writer.writerow([scope, name, int(counts.get("numel", 0))]
                                + ["" if v is None else repr(v) for v in values])
        return buffer.getvalue()


def diff_checkpoints(
    base: str | os.PathLike,
    tuned: str | os.PathLike,
    *,
    tolerances: Sequence[float | str] = DEFAULT_TOLERANCES,
    relative: Sequence[float | str] = (),
    masks_out: str | os.PathLike | None = None,
    allow_missing: bool = False,
    device: str = "cpu",
    progress: Callable[[int, int, str], None] | None = None,
    cache: bool = False,
    resume: str | os.PathLike | None = None,
    retries: int = 5,
    backoff: float = 1.0,
    timeout: float | None = None,
    keep_resume: bool = False,
) -> DiffResult:
    """Update sparsity of ``tuned`` relative to ``base``, streamed one tensor pair at a time.

    ``base`` and ``tuned`` are local checkpoints or hub ids ``org/name[@revision]`` (streamed with
    ranged reads; ``cache`` downloads through the HF cache instead; see :func:`open_source`).
    ``tolerances`` are absolute (``0`` = bit-exact); ``relative`` are Zhu et al.'s η. With
    ``masks_out`` the "changed" masks are saved as a gradtrace masks file: kind ``"update"`` is the
    bitwise change (like the live tracker's), ``"update_abs_<tol:g>"`` / ``"update_rel_<η:g>"`` the others;
    holding them costs 1 bit per element per kind. ``progress(bytes done, bytes in all, tensor name)``
    is called before each tensor (bytes of both checkpoints). With ``resume`` every finished tensor is
    recorded in that file (:mod:`gradtrace.masks.resume`), a rerun skips them, and the file is removed
    once the diff is complete and its masks written, unless ``keep_resume`` is set: then the caller removes
    it once it has stored the result too (the CLI does, after writing ``-o``). ``masks_out`` and ``resume``
    are checked to be writable before anything is read. ``timeout``: see :func:`open_source`. Raises :class:`CheckpointDiffError` on missing files or mismatched
    names, shapes or dtypes, and on hub errors (missing repo or revision, gated, unreachable).
    """
    criteria = make_criteria(tolerances, relative)
    for what, path in (("masks_out", masks_out), ("resume", resume)):
        problem = None if path is None else unwritable_reason(path)
        if problem:
            raise CheckpointDiffError(f"{what}: {problem}; nothing was read")
    started = time.perf_counter()
    per_tensor: dict[str, dict[str, int]] = {}
    specs: dict[str, TensorSpec] = {}
    skipped: list[dict[str, str]] = []
    masks: dict[str, dict[str, PackedMask]] = {}
    dtypes: dict[str, str] = {}
    per_slice: dict[str, list[dict[str, int]]] = {}
    with CheckpointPair(base, tuned, allow_missing=allow_missing, device=device, cache=cache, retries=retries,
                        backoff=backoff, timeout=timeout) as pair:
        notes = list(pair.notes)
        identities = [s.identity for s in pair.sources]
        # read like a live run: the tensors' shapes and the config's expert count name every tensor alike
        declared = tuple(sorted({n for s in pair.sources for n in config_expert_counts(s.config())}))
        experts = expert_layout({spec.name: spec.shape for spec in pair.specs if spec.is_float}, declared)
        notes.extend(experts.warnings)
        state = None
        done: dict[str, tuple[dict[str, int], dict[str, PackedMask]]] = {}
        if resume is not None:
            state = ResumeState(resume, {"base": identities[0], "tuned": identities[1],
                                         "criteria": [c.key for c in criteria], "masks": masks_out is not None})
            try:
                done = state.load()
            except (ResumeStateError, OSError) as err:
                raise CheckpointDiffError(str(err)) from err
        todo: list[TensorSpec] = []
        for spec in pair.specs:
            if not spec.is_float:
                skipped.append({"name": spec.name, "dtype": spec.dtype, "reason": "not a floating-point tensor"})
                continue
            specs[spec.name] = spec
            dtypes[spec.name] = _torch_dtype_name(spec.dtype)
            if spec.name in done and spec.name not in experts.fused:  # per-expert counts are not kept in it
                per_tensor[spec.name], finished_masks = done[spec.name]
                for kind, mask in finished_masks.items():
                    masks.setdefault(kind, {})[spec.name] = mask
            else:
                todo.append(spec)
        if done:
            notes.append(f"resumed from {resume}: {len(per_tensor)} tensors were already compared")
        total_bytes, done_bytes = sum(pair.nbytes(s) for s in todo), 0
        for spec, a, b in pair.stream(todo):
            if progress is not None:
                progress(done_bytes, total_bytes, spec.name)
            slices = experts.fused.get(spec.name)
            counts, tensor_masks = compare_tensors(a, b, criteria, with_masks=masks_out is not None, slices=slices,
                                                   per_slice=per_slice.setdefault(spec.name, []) if slices else None)
            del a, b  # release this pair's pages before the next one is read
            per_tensor[spec.name] = counts
            done_bytes += pair.nbytes(spec)
            for kind, mask in tensor_masks.items():
                masks.setdefault(kind, {})[spec.name] = mask
            if state is not None:
                state.append(spec.name, spec.shape, counts, tensor_masks)
        if progress is not None:
            progress(done_bytes, total_bytes, "")
        bytes_read = pair.bytes_read
    # Resumed tensors are filled in out of order: keep the checkpoint's order in every export.
    per_tensor = {name: per_tensor[name] for name in specs}
    if skipped:
        notes.append(f"skipped {len(skipped)} non-float tensors (e.g. {skipped[0]['name']!r}, {skipped[0]['dtype']})")
    result = DiffResult(str(base), str(tuned), criteria, per_tensor, specs, skipped, notes, per_slice=per_slice,
                        listed_experts=experts.listed, experts=experts, bytes_read=bytes_read,
                        seconds=time.perf_counter() - started)
    if masks_out is not None:
        if not masks:
            raise CheckpointDiffError(f"{base} vs {tuned}: no floating-point tensors to write masks for")
        info = {"source": "gradtrace diff", "base": identities[0], "tuned": identities[1],
                "update": "stored value differs bitwise between base and tuned",
                "tolerances": [c.label for c in result.tolerances], "relative": [c.label for c in result.relative]}
        save_masks(masks_out, masks, dtypes=dtypes, info=info)
    if state is not None and not keep_resume:
        state.remove()
    return result


def _torch_dtype_name(st_dtype: str) -> str:
    """torch's spelling (``"bfloat16"``) of a safetensors dtype, as stored in masks files."""
    return TORCH_NAME.get(st_dtype, st_dtype.lower())
