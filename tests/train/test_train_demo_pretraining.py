"""scripts/pretrain_demo_model.py: the demo base model is made reproducibly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "pretrain_demo_model.py"
TINY = ["--vae-steps", "2", "--unet-steps", "2", "--vae-images", "12", "--unet-images", "12"]


@pytest.mark.slow
def test_pretraining_writes_the_same_bytes_twice_and_a_loadable_model(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    outputs = []
    for name in ("a", "b"):
        out = tmp_path / f"{name}.safetensors"
        subprocess.run(
            [sys.executable, str(SCRIPT), "--out", str(out), *TINY],
            check=True,
            env=env,
            capture_output=True,
            timeout=600,
        )
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1]

    from loraforge.models.pretrained import demo_weights_info, load_demo_weights
    from loraforge.models.tiny import build_tiny_components

    components = build_tiny_components("sd1")
    load_demo_weights(components, tmp_path / "a.safetensors")
    info = demo_weights_info(tmp_path / "a.safetensors")
    assert components["vae"].config.scaling_factor == info["vae_scaling_factor"]
    assert info["settings"]["vae_steps"] == 2 and info["settings"]["threads"] == 1
    assert info["vae_config"] == {"norm_num_groups": components["vae"].config.norm_num_groups}


@pytest.mark.slow
def test_a_vae_with_other_groups_is_loaded_with_its_groups(tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    out = tmp_path / "g1.safetensors"
    options = ["--vae-norm-groups", "1", "--vae-latents", "mean"]
    subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out), *TINY, *options],
        check=True,
        env=env,
        capture_output=True,
        timeout=600,
    )
    from safetensors.torch import load_file

    from loraforge.models.pretrained import demo_weights_info, load_demo_weights
    from loraforge.models.tiny import build_tiny_components

    components = build_tiny_components("sd1")
    assert components["vae"].config.norm_num_groups != 1
    load_demo_weights(components, out)
    vae = components["vae"]
    assert vae.config.norm_num_groups == 1
    assert all(m.num_groups == 1 for m in vae.modules() if isinstance(m, torch.nn.GroupNorm))
    saved = load_file(str(out))
    for key, value in vae.state_dict().items():
        if value.is_floating_point():
            assert torch.equal(value, saved[f"vae.{key}"].float()), key
    info = demo_weights_info(out)
    assert info["vae_config"] == {"norm_num_groups": 1}
    assert info["settings"]["vae_latents"] == "mean"


def test_the_shipped_weights_were_made_with_the_script_defaults(monkeypatch) -> None:
    import importlib.util
    from dataclasses import asdict

    from loraforge.models.pretrained import demo_weights_info

    spec = importlib.util.spec_from_file_location("pretrain_demo_model", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, module)  # dataclasses look their module up
    monkeypatch.setattr(sys, "path", list(sys.path))  # the script puts the repository first
    spec.loader.exec_module(module)
    info = demo_weights_info()
    assert info["settings"] == asdict(module.Settings())
    assert info["made_by"] == "scripts/pretrain_demo_model.py"
