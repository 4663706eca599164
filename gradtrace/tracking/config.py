"""What the tracker measures, and at what memory cost."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

CancellationMode = Literal["off", "sampled", "full"]


@dataclass(frozen=True)
class TrackerConfig:
    """Tracker settings. Device state per tracked element (bytes/param), beside the parameter:

    - gradient mask: always, 1 bit = 0.125 B/param.
    - ``cancellation="sampled"`` (default): fp32 signed and absolute gradient sums on every
      ``sample_stride``-th element: 8 / sample_stride B/param (0.125 at the default stride 64).
      ``"full"``: 8 B/param, exact per element. ``"off"``: nothing; cancelled/absorbed are not split.
    - ``ever_changed=True``: an exact per-step "changed since the last step" detector: a copy of each
      element's value after the last step (the parameter's own size), compared bit for bit after every
      step, plus a 1-bit "ever changed" mask: 2.125 B/param for bf16, 4.125 B/param for fp32.
    - the reference copy of the initial weights, for the update mask: the parameter's own size,
      kept on ``reference_device`` ("cpu" by default: no accelerator memory).
    """

    cancellation: CancellationMode = "sampled"
    sample_stride: int = 64
    cancel_epsilon: float = 0.1
    ever_changed: bool = False
    abs_tolerance: float = 1e-5
    rel_tolerance: float = 1e-3
    reference_device: str = "cpu"
    histogram_bins: int = 20

    def __post_init__(self) -> None:
        if self.cancellation not in ("off", "sampled", "full"):
            raise ValueError(f"cancellation must be 'off', 'sampled' or 'full', not {self.cancellation!r}")
        if self.sample_stride < 1:
            raise ValueError(f"sample_stride must be >= 1, not {self.sample_stride}")
        if not 0 <= self.cancel_epsilon < 1:
            raise ValueError(f"cancel_epsilon must be in [0, 1), not {self.cancel_epsilon}")
        if self.abs_tolerance < 0 or self.rel_tolerance < 0:
            raise ValueError("tolerances must be >= 0")
        # measure() buckets ratios with float32 arithmetic, exact for bin indices below 2**24
        if isinstance(self.histogram_bins, bool) or not isinstance(self.histogram_bins, int) \
                or not 1 <= self.histogram_bins <= 1 << 24:
            raise ValueError(f"histogram_bins must be an integer in [1, 2**24], not {self.histogram_bins!r}")

    @property
    def stride(self) -> int:
        """Stride between elements whose gradient sums are kept (1 = every element)."""
        return 1 if self.cancellation == "full" else self.sample_stride

    @property
    def tracks_sums(self) -> bool:
        return self.cancellation != "off"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> TrackerConfig:
        known = {k: v for k, v in data.items() if k in cls.__dataclass_fields__}
        return cls(**known)
