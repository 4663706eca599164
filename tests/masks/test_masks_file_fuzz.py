"""Fuzzing the masks-file reader: any damage gives a loaded file or a MaskFileError naming the file.

No other exception type may escape ``load_masks`` (a caller catching ``MaskFileError`` must be safe).
"""

from __future__ import annotations

import json
import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from gradtrace.formats.masks_file import FORMAT, MaskFileError, Masks, load_masks, save_masks

SHAPES = {"model.layers.0.self_attn.q_proj.weight": (5, 3), "model.layers.0.mlp.up_proj.bias": (17,),
          "model.norm.weight": (2, 2, 3)}


def original_bytes(tmp_path: Path) -> bytes:
    g = torch.Generator().manual_seed(0)
    masks = {kind: {n: torch.rand(s, generator=g) < 0.5 for n, s in SHAPES.items()} for kind in ("gradient", "update")}
    path = tmp_path / "original.safetensors"
    save_masks(path, masks, dtypes={n: "bfloat16" for n in SHAPES}, step=7, info={"lr": 1e-6})
    return path.read_bytes()


def header_length(data: bytes) -> int:
    return struct.unpack("<Q", data[:8])[0]


class Fuzzer:
    """Writes each variant to one path, loads it, and records any exception that is not allowed."""

    def __init__(self, tmp_path: Path):
        self.path = tmp_path / "variant.safetensors"
        self.failures: list[str] = []
        self.loaded = 0
        self.rejected = 0

    def check(self, description: str, data: bytes | None = None, path: Path | None = None) -> None:
        target = path or self.path
        if data is not None:
            target.write_bytes(data)
        try:
            result = load_masks(target)
        except MaskFileError as err:
            self.rejected += 1
            if str(target) not in str(err):
                self.failures.append(f"{description}: MaskFileError without the file name: {err}")
        except BaseException as err:  # noqa: B036 - the point is to catch *everything* else
            self.failures.append(f"{description}: {type(err).__module__}.{type(err).__name__}: {err}")
        else:
            self.loaded += 1
            # A file that loads must be self-consistent: boolean masks, every kind covering the same
            # parameters with the same shapes.
            shapes = [{n: tuple(m.shape) for n, m in per_param.items()} for per_param in result.values()]
            if (not isinstance(result, Masks) or any(s != shapes[0] for s in shapes)
                    or any(m.dtype != torch.bool for per_param in result.values() for m in per_param.values())):
                self.failures.append(f"{description}: loaded but inconsistent")

    def assert_clean(self) -> None:
        assert not self.failures, "\n".join(self.failures[:20])


def test_truncation_at_every_offset(tmp_path):
    data = original_bytes(tmp_path)
    fuzz = Fuzzer(tmp_path)
    for cut in range(len(data)):
        fuzz.check(f"truncated to {cut} bytes", data[:cut])
    fuzz.assert_clean()
    assert fuzz.loaded == 0  # no truncation is a valid file


def test_random_byte_flips_in_header_and_body(tmp_path):
    data = original_bytes(tmp_path)
    end = 8 + header_length(data)
    rng = random.Random(0)
    fuzz = Fuzzer(tmp_path)
    for trial in range(1500):
        damaged = bytearray(data)
        region = (0, end) if trial % 3 else (end, len(data))  # two thirds in the header
        positions = [rng.randrange(*region) for _ in range(rng.choice((1, 1, 2, 4)))]
        for pos in positions:
            damaged[pos] ^= rng.randrange(1, 256)
        fuzz.check(f"flip at {positions} (header ends at {end})", bytes(damaged))
    fuzz.assert_clean()
    assert fuzz.rejected > 0 and fuzz.loaded > 0  # body flips keep the structure and load


def test_wrong_header_lengths(tmp_path):
    data = original_bytes(tmp_path)
    n = header_length(data)
    fuzz = Fuzzer(tmp_path)
    for value in (0, 1, 2, n - 1, n + 1, n + 100, len(data), len(data) * 2, 2**31, 2**32 + n, 2**63, 2**64 - 1):
        fuzz.check(f"header length {value}", struct.pack("<Q", value) + data[8:])
    fuzz.check("only the length field", data[:8])
    fuzz.assert_clean()


def _with_metadata(tmp_path: Path, change: Callable[[dict], None], tensors=None) -> bytes:
    """A file written by safetensors itself (valid container) whose gradtrace metadata is altered."""
    g = torch.Generator().manual_seed(1)
    masks = {n: torch.rand(s, generator=g) < 0.5 for n, s in SHAPES.items()}
    good = tmp_path / "good.safetensors"
    save_masks(good, {"update": masks}, step=3)
    from safetensors import safe_open

    with safe_open(str(good), "pt") as handle:
        metadata = dict(handle.metadata())
        stored = {k: handle.get_tensor(k) for k in handle.keys()}
    if tensors is not None:
        tensors(stored)
    change(metadata)
    out = tmp_path / "meta.safetensors"
    save_file(stored, str(out), metadata={k: v for k, v in metadata.items() if v is not None})
    return out.read_bytes()


def _params(change: Callable[[dict], object]) -> Callable[[dict], None]:
    def apply(metadata: dict) -> None:
        params = json.loads(metadata["params"])
        result = change(params)
        metadata["params"] = result if isinstance(result, str) else json.dumps(params if result is None else result)
    return apply


METADATA_CASES: dict[str, Callable[[dict], None]] = {
    "no gradtrace_format": lambda m: m.pop("gradtrace_format"),
    "other format": lambda m: m.update(gradtrace_format="gradtrace.masks/999"),
    "params not JSON": lambda m: m.update(params="{not json"),
    "params JSON list": lambda m: m.update(params="[1, 2]"),
    "params JSON string": lambda m: m.update(params='"x"'),
    "params null": lambda m: m.update(params="null"),
    "params missing": lambda m: m.pop("params"),
    "kinds missing": lambda m: m.pop("kinds"),
    "kinds empty": lambda m: m.update(kinds="[]"),
    "kinds object": lambda m: m.update(kinds='{"update": 1}'),
    "kinds unknown kind": lambda m: m.update(kinds='["update", "other"]'),
    "kinds nested list": lambda m: m.update(kinds='[["update"]]'),
    "kinds numbers": lambda m: m.update(kinds="[1, 2]"),
    "kinds deeply nested": lambda m: m.update(kinds="[" * 100000 + "]" * 100000),
    "step not int": lambda m: m.update(step="seven"),
    "step float": lambda m: m.update(step="7.5"),
    "info not JSON": lambda m: m.update(info="{{"),
    "info list": lambda m: m.update(info="[1]"),
    "info deeply nested": lambda m: m.update(info="[" * 100000 + "]" * 100000),
    "shape mismatched": _params(lambda p: p["model.norm.weight"].update(shape=[2, 2, 5])),
    # 16 bits pack into the same 2 bytes as 12: this one loads, with the shape the metadata states.
    "shape changed within the bytes": _params(lambda p: p["model.norm.weight"].update(shape=[2, 2, 4])),
    "shape bigger": _params(lambda p: p["model.layers.0.mlp.up_proj.bias"].update(shape=[10**12])),
    "shape huge product": _params(lambda p: p["model.norm.weight"].update(shape=[2**62, 2**62, 0])),
    "shape negative": _params(lambda p: p["model.norm.weight"].update(shape=[-2, -2, 3])),
    "shape strings": _params(lambda p: p["model.norm.weight"].update(shape=["a", "b"])),
    "shape null": _params(lambda p: p["model.norm.weight"].update(shape=None)),
    "shape number": _params(lambda p: p["model.norm.weight"].update(shape=12)),
    "shape nested": _params(lambda p: p["model.norm.weight"].update(shape=[[2], [6]])),
    "shape floats": _params(lambda p: p["model.norm.weight"].update(shape=[2.5, 4.8])),
    "shape missing": _params(lambda p: p["model.norm.weight"].pop("shape")),
    "spec not object": _params(lambda p: p.update({"model.norm.weight": [2, 2, 3]})),
    "spec string": _params(lambda p: p.update({"model.norm.weight": "2x2x3"})),
    "dtype not string": _params(lambda p: p["model.norm.weight"].update(dtype=[1])),
    "extra param": _params(lambda p: p.update({"extra.weight": {"shape": [3], "dtype": ""}})),
    "missing param": _params(lambda p: p.pop("model.norm.weight")),
    "params empty": _params(lambda p: {}),
}


@pytest.mark.parametrize("case", sorted(METADATA_CASES))
def test_garbage_metadata(tmp_path, case):
    fuzz = Fuzzer(tmp_path)
    fuzz.check(case, _with_metadata(tmp_path, METADATA_CASES[case]))
    fuzz.assert_clean()


def test_mask_tensors_of_wrong_dtype_or_rank(tmp_path):
    name = "update/model.norm.weight"
    fuzz = Fuzzer(tmp_path)
    for description, change in {
        "float32 bits": lambda t: t.update({name: t[name].float()}),
        "2-D bits": lambda t: t.update({name: t[name].reshape(1, -1)}),
        "one byte short": lambda t: t.update({name: t[name][:-1].clone()}),
        "one byte long": lambda t: t.update({name: torch.cat([t[name], t[name][:1]])}),
        "tensor missing": lambda t: t.pop(name),
        "extra tensor": lambda t: t.update({"update/extra": t[name].clone()}),
    }.items():
        fuzz.check(description, _with_metadata(tmp_path, lambda m: None, tensors=change))
    fuzz.assert_clean()


def test_foreign_empty_and_missing_files(tmp_path):
    fuzz = Fuzzer(tmp_path)
    foreign = tmp_path / "model.safetensors"
    save_file({"model.norm.weight": torch.ones(4)}, str(foreign))
    fuzz.check("foreign safetensors without metadata", path=foreign)
    save_file({"w": torch.ones(4)}, str(foreign), metadata={"format": "pt"})
    fuzz.check("foreign safetensors with HF metadata", path=foreign)
    save_file({}, str(foreign), metadata={"gradtrace_format": FORMAT, "params": "{}", "kinds": '["update"]'})
    fuzz.check("no tensors, empty params", path=foreign)
    fuzz.check("empty file", b"")
    fuzz.check("NUL bytes", b"\0" * 64)
    fuzz.check("text file", b"hello, this is not a safetensors file\n" * 10)
    fuzz.check("JSON file", json.dumps({"update": {}}).encode())
    fuzz.check("missing file", path=tmp_path / "does-not-exist.safetensors")
    (tmp_path / "a_directory").mkdir()
    fuzz.check("a directory", path=tmp_path / "a_directory")
    fuzz.assert_clean()
    assert fuzz.loaded <= 1  # at most the degenerate empty-params file loads
