"""Recipe fields of masked loss and the weight average: rules, defaults, kohya names."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.recipe import parse_recipe_text, validate_recipe_text
from loraforge.recipe.kohya_convert import convert_kohya

BASE = "model: {base: org/model}\ndataset: {subsets: [{dir: d}, {dir: r, is_reg: true%s}]}\n"


def findings(text: str, reg: str = ", alpha_mask: true"):
    problems = validate_recipe_text((BASE % reg) + text, source="r.yaml").problems
    return [(p.severity, p.path, p.message, p.line) for p in problems]


def test_masked_loss_without_masks_is_an_error_naming_the_subset() -> None:
    found = findings("training: {masked_loss: true}\n")
    [(severity, path, message, line)] = found
    assert (severity, path, line) == ("error", "dataset.subsets[0].dir", 2)
    assert "subset 0 (" in message and message.endswith("/d) has no masks")
    # a regularization subset needs its masks too (alpha_mask: true counts it fully opaque)
    [reg] = findings("training: {masked_loss: true}\n", reg="")[1:]
    assert reg[1] == "dataset.subsets[1].dir" and "regularization subset 1" in reg[2]


@pytest.mark.parametrize("source", ["alpha_mask: true", "conditioning_data_dir: masks"])
def test_a_mask_source_needs_masked_loss_and_satisfies_it(source: str) -> None:
    text = BASE.replace("{dir: d}", "{dir: d, " + source + "}") % ", alpha_mask: true"
    on = validate_recipe_text(text + "training: {masked_loss: true}\n").problems
    assert on == ()
    off = [(p.severity, p.path) for p in validate_recipe_text(text).problems]
    field = source.split(":")[0]
    assert ("warning", f"dataset.subsets[0].{field}") in off


def test_both_mask_sources_warn_that_the_folder_wins() -> None:
    text = BASE.replace("{dir: d}", "{dir: d, alpha_mask: true, conditioning_data_dir: m}")
    problems = validate_recipe_text(text % "" + "training: {masked_loss: true}\n").problems
    [warning] = [p for p in problems if p.severity == "warning"]
    assert warning.path == "dataset.subsets[0].alpha_mask" and "folder is used" in warning.message


def test_ema_defaults_and_warnings() -> None:
    off = parse_recipe_text(BASE % "", base_dir=Path("/p"))
    assert off.training.ema is None and off.training.masked_loss is False
    on = parse_recipe_text((BASE % "") + "training: {ema: {}}\n", base_dir=Path("/p"))
    ema = on.training.ema
    assert (ema.decay, ema.warmup, ema.start_step, ema.every_n_steps) == (0.999, True, 0, 1)
    assert (ema.device, ema.save_raw) == ("same", False)
    late = findings("training: {max_train_steps: 10, ema: {start_step: 10}}\n", reg="")
    assert [(s, p) for s, p, *_ in late] == [("warning", "training.ema.start_step")]
    free = findings("training: {optimizer: AdamWScheduleFree, ema: {decay: 0.99}}\n", reg="")
    assert [(s, p) for s, p, *_ in free] == [("warning", "training.ema")]
    bad = findings("training: {ema: {decay: 1.0, device: gpu}}\n", reg="")
    assert {p for _, p, *_ in bad} == {"training.ema.decay", "training.ema.device"}


def test_mask_folder_paths_are_relative_to_the_recipe() -> None:
    text = BASE.replace("{dir: d}", "{dir: d, conditioning_data_dir: masks}") % ""
    recipe = parse_recipe_text(text, base_dir=Path("/project"))
    assert recipe.dataset.subsets[0].conditioning_data_dir == "/project/masks"


def test_kohya_names_convert_and_alpha_mask_turns_masked_loss_on(tmp_path: Path) -> None:
    converted = convert_kohya(
        {"train_data_dir": "img", "alpha_mask": True, "conditioning_data_dir": "masks"},
        tmp_path,
    )
    [subset] = converted.recipe["dataset"]["subsets"]
    assert subset == {"dir": "img", "alpha_mask": True, "conditioning_data_dir": "masks"}
    # sd-scripts masks the loss whenever alpha masks are there
    assert converted.recipe["training"] == {"masked_loss": True}
    assert any("masked_loss" in note for note in converted.notes)
    explicit = convert_kohya({"train_data_dir": "img", "masked_loss": True}, tmp_path)
    assert explicit.recipe["training"] == {"masked_loss": True} and not explicit.notes
    plain = convert_kohya({"train_data_dir": "img"}, tmp_path)
    assert "training" not in plain.recipe
