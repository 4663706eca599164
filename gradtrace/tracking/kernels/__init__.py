"""The kernels that fold steps into the state and measure it, and the public choice between them.

:mod:`.torch_path` runs anywhere; :mod:`.numpy_scan` and :mod:`.numpy_measure` do the same work for CPU
tensors through NumPy, bit-identical and several times faster. :class:`Backend` picks, per parameter.
"""

from __future__ import annotations

from gradtrace.tracking.kernels import numpy_measure, numpy_scan

BACKENDS = ("auto", "torch", "numpy")


class Backend:
    """Which kernels a :class:`~gradtrace.tracking.tracker.GradTracker` uses.

    ``"torch"``: the torch path everywhere. ``"numpy"``: the NumPy path for every tensor it supports (dense
    contiguous CPU bf16/fp16/fp32), the torch path for the others. ``"auto"`` (default): today the same as
    ``"numpy"``. ``chunk_elements``: the NumPy step scan's chunk size (a positive multiple of 8; tests use
    small ones to cross chunk boundaries on small tensors).
    """

    def __init__(self, name: str = "auto", *, chunk_elements: int | None = None):
        if name not in BACKENDS:
            raise ValueError(f"backend must be one of {', '.join(map(repr, BACKENDS))}, not {name!r}")
        self.name = name
        self.scanner: numpy_scan.CpuScanner | None = None
        if name != "torch":
            self.scanner = numpy_scan.CpuScanner(chunk_elements or numpy_scan.CHUNK_ELEMENTS)

    @classmethod
    def of(cls, choice: str | Backend) -> Backend:
        return choice if isinstance(choice, Backend) else cls(choice)

    def scans(self, tensor) -> bool:
        """Whether a step's gradient (or the values after it) of this tensor goes through NumPy."""
        return self.scanner is not None and numpy_scan.supports(tensor)

    def measurer(self, histogram_bins: int) -> numpy_measure.CpuMeasurer | None:
        """A fresh NumPy measurer for one ``measure()``/``packed_masks()`` call, or ``None`` (torch only)."""
        return numpy_measure.CpuMeasurer(histogram_bins) if self.name != "torch" else None

    def __repr__(self) -> str:
        return f"Backend({self.name!r})"
