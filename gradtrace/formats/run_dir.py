"""The files of a gradtrace run directory, by name: what writers create and readers look for."""

from __future__ import annotations

LOG_NAME = "log.jsonl"  # the local run log (gradtrace.formats.run_log)
MASKS_NAME = "masks.safetensors"  # the exported masks (gradtrace.formats.masks_file)
SUMMARY_NAME = "summary.json"  # the final summary with the run's info
STATE_NAME = "tracker_state.safetensors"  # the tracker's state in a checkpoint, to resume from
