"""loraforge's own merge of a LyCORIS file equals what the network computed while training, for
every algorithm and option, on the tiny SD1 and SDXL models: train_norm's norm modules and the
bias deltas of full modules included (they used to be dropped)."""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip("lycoris")

import torch

from loraforge.ops.merge import WeightedLora
from loraforge.ops.merge_into import merge_into_state_dict
from loraforge.ops.modules import parse_lora
from loraforge.ops.targets import diffusers_targets, flatten_components, split_components

from .test_lycoris_models import CASES, _batch, _config, _perturbed, _predict

_COMPONENTS = ("text_encoder", "text_encoder_2")


def _merged_copy(models: Any, tensors: dict[str, torch.Tensor]) -> Any:
    """``models`` with the file merged into their weights by loraforge.ops (in place)."""
    states = {"unet": models.unet.state_dict()}
    for name, encoder in zip(_COMPONENTS, models.text_encoders, strict=False):
        states[name] = encoder.state_dict()
    config = dict(models.unet.config)
    targets = diffusers_targets(models.family, states, config)
    flat = flatten_components(states)
    parsed = parse_lora(tensors)
    assert not parsed.unused_keys

    def resolve(name: str) -> Any:
        target = targets.get(name)
        return None if target is None else target.ref

    report = merge_into_state_dict(flat, [WeightedLora(parsed, 1.0)], resolve)
    assert report.skipped == ((),), report.skipped[0][:3]
    merged = split_components(flat)
    models.unet.load_state_dict(merged["unet"])
    for name, encoder in zip(_COMPONENTS, models.text_encoders, strict=False):
        encoder.load_state_dict(merged[name])
    return report


# What used to be dropped or read on the wrong axis runs in the fast set; the rest (whose merge
# unit tests live in tests/ops) and SDXL in the slow set.
_FAST = {"full", "lora-train-norm", "lora-dora", "loha-dora", "lokr-dora"}


def _params() -> list[Any]:
    params = []
    for family in ("sd1", "sdxl"):
        for case_id, algorithm, args in CASES:
            slow = family == "sdxl" or case_id not in _FAST
            marks = [pytest.mark.slow] if slow else []
            params.append(
                pytest.param(algorithm, args, family, id=f"{case_id}-{family}", marks=marks)
            )
    return params


@pytest.mark.parametrize(("algorithm", "args", "family"), _params())
def test_loraforge_merge_equals_the_trained_forward(
    algorithm: str, args: dict, family: str, tiny_models: Any, lyco_config: Any
) -> None:
    models = tiny_models(family)
    batch = _batch(models)
    network = _perturbed(models, _config(lyco_config, algorithm, args), seed=2)
    with torch.no_grad():
        trained = _predict(models, batch)
    tensors = network.state_dict_for_save(torch.float32)

    fresh = tiny_models(family)
    with torch.no_grad():
        untouched = _predict(fresh, batch)
    report = _merged_copy(fresh, tensors)
    if algorithm == "full" or args.get("train_norm"):
        assert report.biases[0] > 0  # diff_b / b_norm went into the biases
    with torch.no_grad():
        merged = _predict(fresh, batch)
    assert not torch.allclose(merged, untouched, atol=1e-4)
    torch.testing.assert_close(merged, trained, rtol=1e-4, atol=1e-4)
