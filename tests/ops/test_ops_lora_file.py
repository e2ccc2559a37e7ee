"""Reading and writing LoRA files: sd-scripts hashes, pickles, truncated and foreign files."""

from __future__ import annotations

import hashlib
from io import BytesIO
from pathlib import Path

import pytest
import safetensors.torch
import torch

from loraforge.errors import LoraFileError, OutputExistsError
from loraforge.ops.load_lora import load_lora
from loraforge.ops.lora_file import read_lora_file, sshs_hashes, write_lora_file


def _kohya_hashes(tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> tuple[str, str]:
    """sd-scripts' library/train_util.py precalculate_safetensors_hashes, step by step."""
    metadata = {k: v for k, v in metadata.items() if k.startswith("ss_")}
    b = BytesIO(safetensors.torch.save(tensors, metadata))
    model = hashlib.sha256()
    b.seek(0)
    n = int.from_bytes(b.read(8), "little")
    b.seek(n + 8)
    for chunk in iter(lambda: b.read(1024 * 1024), b""):
        model.update(chunk)
    legacy = hashlib.sha256()
    b.seek(0x100000)
    legacy.update(b.read(0x10000))
    return model.hexdigest(), legacy.hexdigest()[0:8]


def test_hashes_match_sd_scripts_for_small_and_large_files(synth) -> None:
    small = synth.lora("lora_unet_a", 8, 8, 2, alpha=1)
    # over 1 MiB so the legacy hash reads real data at offset 0x100000
    large = synth.lora("lora_unet_b", 1280, 1280, 128, alpha=32)
    meta = {"ss_network_dim": "64", "modelspec.title": "x", "ss_tag_frequency": "{}"}
    for tensors in (small, large):
        assert sshs_hashes(tensors, meta) == _kohya_hashes(tensors, meta)
    # non-ss metadata does not change the hash, ss metadata does (it shifts the header)
    assert sshs_hashes(large, {**meta, "modelspec.title": "y"}) == sshs_hashes(large, meta)
    assert sshs_hashes(large, {**meta, "ss_output_name": "z"})[1] != sshs_hashes(large, meta)[1]


def test_write_then_read_round_trip(tmp_path: Path, synth) -> None:
    tensors = synth.lora("lora_unet_a", 8, 6, 2, alpha=1)
    written = write_lora_file(tmp_path / "a.safetensors", tensors, {"ss_network_dim": "2"})
    back = read_lora_file(tmp_path / "a.safetensors")
    assert back.metadata == written
    assert back.metadata["sshs_model_hash"] == _kohya_hashes(tensors, written)[0]
    for key, value in tensors.items():
        assert torch.equal(back.tensors[key], value)


def test_write_refuses_overwrite_and_non_safetensors(tmp_path: Path, synth) -> None:
    target = tmp_path / "a.safetensors"
    target.write_bytes(b"mine")
    with pytest.raises(OutputExistsError):
        write_lora_file(target, synth.lora("lora_unet_a", 4, 4, 1), {})
    assert target.read_bytes() == b"mine"
    with pytest.raises(LoraFileError, match="safetensors"):
        write_lora_file(tmp_path / "a.pt", synth.lora("lora_unet_a", 4, 4, 1), {})
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.safetensors"]


def test_failed_write_leaves_no_partial_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, synth
) -> None:
    def boom(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(safetensors.torch, "save_file", boom)
    with pytest.raises(KeyboardInterrupt):
        write_lora_file(tmp_path / "a.safetensors", synth.lora("lora_unet_a", 4, 4, 1), {})
    assert list(tmp_path.iterdir()) == []


def test_pickle_is_refused_unless_allowed(tmp_path: Path, synth) -> None:
    tensors = synth.lora("lora_unet_a", 4, 4, 1, alpha=1)
    torch.save(tensors, tmp_path / "a.pt")
    with pytest.raises(LoraFileError, match="pickle") as info:
        read_lora_file(tmp_path / "a.pt")
    assert "--allow-pickle" in str(info.value)
    assert torch.equal(
        read_lora_file(tmp_path / "a.pt", allow_pickle=True).tensors["lora_unet_a.alpha"],
        tensors["lora_unet_a.alpha"],
    )
    # a pickle renamed to .safetensors is recognised by content
    (tmp_path / "b.safetensors").write_bytes((tmp_path / "a.pt").read_bytes())
    with pytest.raises(LoraFileError, match="pickle"):
        read_lora_file(tmp_path / "b.safetensors")


def test_pickle_with_code_is_refused_even_when_allowed(tmp_path: Path) -> None:
    torch.save({"lora_unet_a.alpha": torch.tensor(1.0), "evil": Path("x")}, tmp_path / "a.pt")
    with pytest.raises(LoraFileError, match="weights-only"):
        read_lora_file(tmp_path / "a.pt", allow_pickle=True)


def test_truncated_and_foreign_files_are_clear_errors(tmp_path: Path, synth) -> None:
    good = synth.save(tmp_path / "good.safetensors", synth.lora("lora_unet_a", 64, 64, 8, alpha=4))
    data = good.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[: len(data) - 100])
    with pytest.raises(LoraFileError, match="truncated"):
        read_lora_file(tmp_path / "cut.safetensors")
    (tmp_path / "tiny.safetensors").write_bytes(data[:5])
    with pytest.raises(LoraFileError, match="not a readable safetensors"):
        read_lora_file(tmp_path / "tiny.safetensors")
    (tmp_path / "text.safetensors").write_text("hello, I am a text file pretending")
    with pytest.raises(LoraFileError, match="not a readable safetensors"):
        read_lora_file(tmp_path / "text.safetensors")
    with pytest.raises(LoraFileError, match="no such file"):
        read_lora_file(tmp_path / "missing.safetensors")
    with pytest.raises(LoraFileError, match="folder"):
        read_lora_file(tmp_path)


def test_non_lora_safetensors_is_refused(tmp_path: Path, synth) -> None:
    synth.save(
        tmp_path / "model.safetensors",
        {"model.diffusion_model.out.2.weight": torch.zeros(4, 4, 3, 3)},
    )
    with pytest.raises(LoraFileError, match="not a LoRA file"):
        load_lora(tmp_path / "model.safetensors")


def test_safetensors_whose_header_length_starts_with_0x80_is_not_a_pickle(
    tmp_path: Path, synth
) -> None:
    # regression: the first byte of a safetensors file is the low byte of its header length;
    # 0x80 is also pickle's PROTO opcode, and such files were once refused as pickles
    tensors = synth.lora("lora_unet_a", 4, 4, 1, alpha=1)
    for pad in range(300):
        path = synth.save(tmp_path / "a.safetensors", tensors, {"pad": "x" * pad})
        if path.read_bytes()[0] == 0x80:
            break
    assert path.read_bytes()[0] == 0x80
    assert read_lora_file(path).metadata["pad"] == "x" * pad
