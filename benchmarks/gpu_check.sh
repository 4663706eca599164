#!/usr/bin/env bash
# GPU readiness in one run (under 10 minutes): the torch path's bit-exactness tests on CUDA (fp32, bf16,
# fp16), benchmarks/hot_path.py and benchmarks/overhead.py on a ~0.5B-parameter model (Qwen2-0.5B's
# shapes, built from its config), and one JSON with the GPU, the versions and the figures.
#
#   benchmarks/gpu_check.sh [OUT_DIR]                 # OUT_DIR defaults to $OUT, else ./gpu-check
#   DEVICE=cpu SIZE=tiny benchmarks/gpu_check.sh /tmp/gc   # dry run on a CPU machine: the script end to end
#
# Environment: DEVICE (cuda | cpu, default cuda), SIZE (large | mid | tiny, default large), PYTHON
# (default python). Each stage has its own timeout, so a slow one leaves the others' results; the
# combined file is OUT_DIR/gpu_check.json, beside each stage's log and JSON. Exit status: 0 when every
# stage finished and no test failed.
set -u
cd "$(dirname "$0")/.."
OUT_DIR=${1:-${OUT:-gpu-check}}
DEVICE=${DEVICE:-cuda}
SIZE=${SIZE:-large}
PYTHON=${PYTHON:-python}
mkdir -p "$OUT_DIR"
export HF_HUB_OFFLINE=1 WANDB_MODE=offline WANDB_SILENT=true PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
started=$(date +%s)

stage() {  # stage NAME SECONDS COMMAND...: run with a timeout, log to OUT_DIR/NAME.log, record rc and time
  local name=$1 limit=$2
  shift 2
  local t0
  t0=$(date +%s)
  echo "== $name (limit ${limit}s)"
  timeout --kill-after=10 "$limit" "$@" >"$OUT_DIR/$name.log" 2>&1
  local rc=$?
  echo "{\"rc\": $rc, \"seconds\": $(($(date +%s) - t0)), \"limit_s\": $limit}" >"$OUT_DIR/$name.rc.json"
  echo "   rc=$rc in $(($(date +%s) - t0))s"
  tail -n 3 "$OUT_DIR/$name.log"
}

nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$OUT_DIR/nvidia-smi.txt" 2>&1 || true

# 1. bit-exactness: on CUDA the cuda cases run (the CPU cases too: a second, independent path)
stage exactness 90 "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/tracking/test_cuda_exactness.py \
  --junitxml "$OUT_DIR/exactness.xml"
# 2. the tracker's own calls, bf16 weights, timed directly
stage hot_path 120 "$PYTHON" benchmarks/hot_path.py --device "$DEVICE" --model "$SIZE" --json "$OUT_DIR/hot_path.json"
# 3. per-step overhead inside transformers.Trainer: uninstrumented, gradtrace off/sampled, the read floor;
#    one run per weight dtype so that a timeout keeps the other's figures
for dtype in bfloat16 float32; do
  stage "overhead-$dtype" 170 "$PYTHON" benchmarks/overhead.py --device "$DEVICE" --model "$SIZE" \
    --only "$SIZE-$dtype-ga1" --variants "gradtrace off,gradtrace sampled,read floor" --rounds 2 --steps 4 \
    --no-profile --out "$OUT_DIR/overhead-$dtype.json"
done

"$PYTHON" - "$OUT_DIR" "$DEVICE" "$SIZE" "$started" <<'EOF'
import json, sys, time, xml.etree.ElementTree as ET
from pathlib import Path

out, device, size, started = Path(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4])


def load(name):
    path = out / name
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


import torch  # noqa: E402
import transformers  # noqa: E402

import gradtrace  # noqa: E402

result = {
    "device": device, "size": size,
    "gpu": {"nvidia_smi": (out / "nvidia-smi.txt").read_text().strip() if (out / "nvidia-smi.txt").exists() else None,
            "torch_name": torch.cuda.get_device_name() if torch.cuda.is_available() else None},
    "versions": {"torch": torch.__version__, "cuda": torch.version.cuda, "transformers": transformers.__version__,
                 "python": sys.version.split()[0], "gradtrace_file": gradtrace.__file__},
    "stages": {name: load(f"{name}.rc.json") for name in ("exactness", "hot_path", "overhead-bfloat16",
                                                          "overhead-float32")},
}
try:
    suite = ET.parse(out / "exactness.xml").getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    cases = [{"name": c.get("name"), "outcome": "failed" if c.find("failure") is not None or c.find("error") is not None
              else "skipped" if c.find("skipped") is not None else "passed",
              "skip_reason": c.find("skipped").get("message") if c.find("skipped") is not None else None}
             for c in suite.iter("testcase")]
    result["exactness"] = {"passed": sum(c["outcome"] == "passed" for c in cases),
                           "failed": [c["name"] for c in cases if c["outcome"] == "failed"],
                           "skipped": [f"{c['name']}: {c['skip_reason']}" for c in cases if c["outcome"] == "skipped"],
                           "cuda_cases_passed": sum(c["outcome"] == "passed" and "cuda" in c["name"] for c in cases)}
except (OSError, ET.ParseError, AttributeError) as err:
    result["exactness"] = {"error": f"{type(err).__name__}: {err}"}
result["hot_path"] = load("hot_path.json")
result["overhead"] = {}
for dtype in ("bfloat16", "float32"):
    data = load(f"overhead-{dtype}.json")
    if data is None:
        result["overhead"][dtype] = None
        continue
    result["overhead"][dtype] = {
        "settings": {s["setting"]["name"]: {"params": s["numel"], "variants": {
            name: {"step_ms_median": row["step_wall_s"]["median"] * 1e3, "ratio": row["ratio"],
                   "ratio_per_round": row["ratio_per_round"],
                   "in_gradtrace_ms_median": row["in_gradtrace_ms"]["median"] * 1e3 if row["in_gradtrace_ms"] else None,
                   "logging_step_ms": row["logging_step_wall_s"] * 1e3 if row["logging_step_wall_s"] else None}
            for name, row in s["variants"].items()}} for s in data["settings"]},
        "memory_and_logging": [{k: r[k] for k in ("model", "dtype", "mode", "state_device_bytes_per_param",
                                                  "observe_s_median", "measure_s_median")}
                               for r in data["memory_and_logging"]],
        "machine": {k: data["machine"].get(k) for k in ("cpu", "cores_available", "torch", "cuda_device")},
    }
result["total_seconds"] = int(time.time()) - started
failed = [name for name, rc in result["stages"].items() if rc is None or rc["rc"] != 0]
result["ok"] = not failed and not result["exactness"].get("failed") and "error" not in result["exactness"] \
    and (device != "cuda" or result["exactness"].get("cuda_cases_passed", 0) > 0)  # on a GPU: really on it
result["failed_stages"] = failed
(out / "gpu_check.json").write_text(json.dumps(result, indent=1))
print(f"wrote {out / 'gpu_check.json'}: ok={result['ok']} failed stages={failed} in {result['total_seconds']} s")
sys.exit(0 if result["ok"] else 1)
EOF
