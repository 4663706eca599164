"""Masks files: exact round trip, atomic writes, a clear error naming the file for bad input, writes refused
where a read would be, packing of unaligned views."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from gradtrace import MaskFileError, load_masks, save_masks
from gradtrace.formats.bitpack import pack_bits, popcount, unpack_bits
from gradtrace.formats.masks_file import FORMAT, PackedMask, read_packed_masks


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 63, 64, 1000, 4099])
def test_pack_bits_matches_numpy_packbits(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) < 0.3
    packed = pack_bits(mask)
    assert np.array_equal(packed.numpy(), np.packbits(mask.numpy(), bitorder="little"))
    assert torch.equal(unpack_bits(packed, numel), mask)
    assert int(popcount(packed)) == int(mask.sum())


def sample_masks() -> dict:
    generator = torch.Generator().manual_seed(0)
    shapes = {"model.layers.0.self_attn.q_proj.weight": (8, 5), "model.norm.weight": (5,), "lm_head.weight": (3, 7)}
    return {kind: {name: torch.rand(shape, generator=generator) < 0.4 for name, shape in shapes.items()}
            for kind in ("gradient", "update")}


def test_round_trip_is_exact_and_keeps_metadata(tmp_path):
    masks = sample_masks()
    path = tmp_path / "masks.safetensors"
    save_masks(path, masks, dtypes={"lm_head.weight": "bfloat16"}, step=12, info={"lr": 1e-6})
    loaded = load_masks(path)
    assert set(loaded) == {"gradient", "update"}
    for kind in masks:
        for name, mask in masks[kind].items():
            assert loaded[kind][name].dtype == torch.bool
            assert torch.equal(loaded[kind][name], mask)
    assert loaded.step == 12 and loaded.info == {"lr": 1e-6} and loaded.dtypes["lm_head.weight"] == "bfloat16"
    # bit-packed: 1 bit per element (plus padding to whole bytes)
    packed, _ = read_packed_masks(path)
    assert packed["gradient"]["model.layers.0.self_attn.q_proj.weight"].bits.numel() == 5


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_written_files_get_the_mode_a_plain_write_would(tmp_path, umask):
    import os
    import stat

    from gradtrace.formats.atomic import write_json_atomic

    previous = os.umask(umask)
    try:
        plain = tmp_path / "plain.txt"
        with open(plain, "w") as handle:
            handle.write("x")
        save_masks(tmp_path / "masks.safetensors", sample_masks(), step=1)
        write_json_atomic(tmp_path / "summary.json", {"a": 1})
    finally:
        os.umask(previous)
    expected = stat.S_IMODE(plain.stat().st_mode)
    assert expected == 0o666 & ~umask
    assert stat.S_IMODE((tmp_path / "masks.safetensors").stat().st_mode) == expected
    assert stat.S_IMODE((tmp_path / "summary.json").stat().st_mode) == expected


def test_write_is_atomic_when_the_writer_fails(tmp_path, monkeypatch):
    path = tmp_path / "masks.safetensors"
    save_masks(path, sample_masks(), step=1)
    before = path.read_bytes()

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("gradtrace.formats.masks_file.save_file", full_disk)
    with pytest.raises(OSError, match="No space"):
        save_masks(path, sample_masks(), step=2)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["masks.safetensors"]  # no temp file left behind


def test_truncated_file_names_the_file(tmp_path):
    path = tmp_path / "masks.safetensors"
    save_masks(path, sample_masks())
    data = path.read_bytes()
    for cut in (0, 4, 9, len(data) // 2, len(data) - 1):
        path.write_bytes(data[:cut])
        with pytest.raises(MaskFileError, match=str(path)):
            load_masks(path)


def test_garbage_and_foreign_files_are_refused(tmp_path):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00\x01not a safetensors file at all" * 10)
    with pytest.raises(MaskFileError, match="garbage.safetensors"):
        load_masks(garbage)
    foreign = tmp_path / "model.safetensors"
    save_file({"weight": torch.zeros(3)}, str(foreign))
    with pytest.raises(MaskFileError, match="not a gradtrace masks file"):
        load_masks(foreign)
    with pytest.raises(MaskFileError, match="no such masks file"):
        load_masks(tmp_path / "missing.safetensors")


def test_wrong_sizes_in_a_well_formed_file_are_refused(tmp_path):
    path = tmp_path / "masks.safetensors"
    save_masks(path, sample_masks())
    packed, _ = read_packed_masks(path)
    tensors = {f"{k}/{n}": m.bits for k, per in packed.items() for n, m in per.items()}
    tensors["update/lm_head.weight"] = torch.zeros(1, dtype=torch.uint8)  # 21 bits need 3 bytes
    from safetensors import safe_open

    with safe_open(str(path), "pt") as handle:
        metadata = handle.metadata()
    save_file(tensors, str(path), metadata=metadata)
    with pytest.raises(MaskFileError, match="update/lm_head.weight"):
        load_masks(path)


def write_raw(path: Path, shape, bits: torch.Tensor) -> None:
    metadata = {"gradtrace_format": FORMAT, "params": json.dumps({"w": {"shape": shape, "dtype": ""}}),
                "kinds": json.dumps(["gradient"]), "step": "", "info": "{}"}
    save_file({"gradient/w": bits}, str(path), metadata=metadata)


@pytest.mark.parametrize(("shape", "bits"), [
    ([0, 2 ** 70], 0),  # zero elements, but no tensor has a size of 2**70
    ([2 ** 40, 2 ** 40], 0),  # 2**80 elements
    ([8.7], 2),  # not an integer (int() would make it 8)
    ([True, 8], 1),
], ids=["huge-size", "huge-product", "float-size", "bool-size"])
def test_shapes_that_are_no_tensors_are_refused_naming_file_and_parameter(tmp_path, shape, bits):
    path = tmp_path / "odd.safetensors"
    write_raw(path, shape, torch.zeros(bits, dtype=torch.uint8))
    with pytest.raises(MaskFileError, match=r"odd\.safetensors.*'w'"):
        load_masks(path)


@pytest.mark.parametrize("mask", [
    PackedMask(torch.zeros(1, dtype=torch.uint8), (21,)),  # 21 bits need 3 bytes
    PackedMask(torch.zeros(3, dtype=torch.int64), (21,)),
    PackedMask(torch.zeros(3, 1, dtype=torch.uint8), (21,)),
    PackedMask(torch.zeros(0, dtype=torch.uint8), (0, 2 ** 70)),
], ids=["short", "int64", "2-d", "huge-shape"])
def test_save_masks_refuses_what_load_masks_would_and_writes_nothing(tmp_path, mask):
    path = tmp_path / "masks.safetensors"
    with pytest.raises(ValueError, match="gradient/w"):
        save_masks(path, {"gradient": {"w": mask}})
    assert not path.exists()


def test_save_masks_refuses_kind_and_parameter_names_that_collide(tmp_path):
    one, other = torch.tensor([True, False]), torch.tensor([False, True])
    # "a" + "b/c" and "a/b" + "c" are both the tensor "a/b/c": one mask would silently replace the other
    masks = {"a": {"b/c": one, "c": one}, "a/b": {"b/c": other, "c": other}}
    with pytest.raises(ValueError, match="collide"):
        save_masks(tmp_path / "masks.safetensors", masks)


@pytest.mark.parametrize("offset", range(1, 8))
def test_pack_bits_of_a_view_not_aligned_to_8_bytes(offset):
    base = torch.rand(64 + offset, generator=torch.Generator().manual_seed(offset)) > 0.5
    view = base[offset:offset + 48]  # contiguous, length a multiple of 8, storage offset not
    assert view.is_contiguous() and view.storage_offset() % 8
    expected = np.packbits(view.numpy(), bitorder="little")
    assert np.array_equal(pack_bits(view).numpy(), expected)
