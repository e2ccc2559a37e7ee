"""Recipe validation: every error reported at once, with file:line:column and suggestions."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from loraforge.errors import RecipeError
from loraforge.recipe import (
    load_recipe,
    parse_recipe_text,
    validate_recipe_file,
    validate_recipe_text,
)

MINIMAL = "model: {base: org/model}\ndataset: {subsets: [{dir: data}]}\n"


def _problems(text: str):
    return validate_recipe_text(textwrap.dedent(text), source="r.yaml").problems


def test_minimal_recipe_gets_schema_defaults(tmp_path: Path) -> None:
    recipe = parse_recipe_text(MINIMAL, base_dir=tmp_path)
    assert recipe.model.base == "org/model"  # a hub id stays as written
    assert recipe.dataset.resolution == (512, 512)
    assert recipe.dataset.subsets[0].dir == str(tmp_path / "data")
    assert recipe.network.dim == 16 and recipe.network.alpha == 8.0
    assert recipe.training.learning_rate == 1e-4
    assert recipe.output.metadata.tags == ()


def test_scientific_notation_is_a_float() -> None:
    recipe = parse_recipe_text(
        MINIMAL + "training: {learning_rate: 1e-4, unet_lr: 3E-5, text_encoder_lr: 1}\n"
    )
    assert recipe.training.learning_rate == pytest.approx(1e-4)
    assert recipe.training.unet_lr == pytest.approx(3e-5)
    assert isinstance(recipe.training.text_encoder_lr, float)


def test_typo_wrong_type_and_bad_enum_all_reported_with_lines() -> None:
    problems = _problems(
        """\
        model:
          base: org/model
        netwrok:
          dim: 4
        dataset:
          subsets:
            - dir: data
              repeats: big
        training:
          optimizer: AdamW9bit
        """
    )
    by_path = {p.path: p for p in problems}
    assert set(by_path) == {"netwrok", "dataset.subsets[0].repeats", "training.optimizer"}
    assert (by_path["netwrok"].line, by_path["netwrok"].column) == (3, 1)
    assert by_path["netwrok"].hint == 'did you mean "network"?'
    assert by_path["dataset.subsets[0].repeats"].line == 8
    assert '"big"' in by_path["dataset.subsets[0].repeats"].message
    assert by_path["training.optimizer"].line == 10
    assert by_path["training.optimizer"].hint == 'did you mean "AdamW8bit"?'
    assert str(by_path["netwrok"]).startswith("r.yaml:3:1: netwrok: unknown key")


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", "empty"),
        ("- a\n- b\n", "mapping"),
        ("model: [\n", "YAML syntax"),
        ("model:\n\tbase: x\n", "tabs"),
        ("model: {base: a/b}\nmodel: {base: c/d}\ndataset: {subsets: [{dir: d}]}\n", "twice"),
        (MINIMAL + "network: {dim: 99999999999999999999999}\n", "<= 4096"),
        (MINIMAL + "training: {seed: -1}\n", ">= 0"),
        ("model: {}\ndataset: {subsets: []}\n", "required"),
        (
            "model: {base: a/b}\ndataset: {subsets: [{dir: d}], resolution: [1]}\n",
            "512 or [832, 1216]",
        ),
    ],
)
def test_bad_documents_become_problems(text: str, expected: str) -> None:
    problems = _problems(text)
    assert problems, text
    assert all(p.severity == "error" for p in problems)
    rendered = " ".join(str(p) for p in problems)
    assert expected in rendered


def test_unreadable_files_raise_recipe_errors(tmp_path: Path) -> None:
    with pytest.raises(RecipeError, match="no such file"):
        load_recipe(tmp_path / "missing.yaml")
    with pytest.raises(RecipeError, match="directory"):
        load_recipe(tmp_path)
    latin1 = tmp_path / "latin1.yaml"
    latin1.write_bytes("model: {base: caf\xe9}\n".encode("latin-1"))
    with pytest.raises(RecipeError, match="UTF-8"):
        load_recipe(latin1)


def test_utf8_bom_is_accepted(tmp_path: Path) -> None:
    path = tmp_path / "bom.yaml"
    path.write_bytes(b"\xef\xbb\xbf" + MINIMAL.encode())
    assert validate_recipe_file(path).recipe is not None


def test_load_recipe_lists_all_errors(tmp_path: Path) -> None:
    path = tmp_path / "r.yaml"
    path.write_text("model: {base: a/b, famly: sd1}\ndataset: {subsets: [{dir: d, repeats: 0}]}\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert "2 errors" in info.value.message
    assert "r.yaml:1:20" in info.value.message and "r.yaml:2:39" in info.value.message


def test_relative_paths_resolve_against_the_recipe_folder(tmp_path: Path) -> None:
    (tmp_path / "models").mkdir()
    path = tmp_path / "r.yaml"
    path.write_text(
        "model: {base: models, vae: vae.safetensors}\n"
        "dataset: {subsets: [{dir: imgs}]}\noutput: {dir: out}\n"
    )
    recipe = load_recipe(path)
    assert recipe.model.base == str(tmp_path / "models")
    assert recipe.model.vae == str(tmp_path / "vae.safetensors")
    assert recipe.output.dir == str(tmp_path / "out")


def test_to_dict_is_json_serialisable() -> None:
    import json

    data = parse_recipe_text(MINIMAL).to_dict()
    assert json.loads(json.dumps(data))["network"]["dim"] == 16


def test_yes_no_stay_strings_like_yaml_1_2() -> None:
    # Regression: YAML 1.1 reads `no` as false, breaking kohya's `mixed_precision: no`.
    recipe = parse_recipe_text(MINIMAL + "training: {mixed_precision: no}\n")
    assert recipe.training.mixed_precision == "no"
    assert (
        parse_recipe_text(
            MINIMAL + "cache: {latents: none}\nnetwork: {train_unet: true}\n"
        ).network.train_unet
        is True
    )


def test_section_defaults_come_from_the_schema() -> None:
    from loraforge.recipe import load_schema, section_defaults

    network = section_defaults("network")
    schema = load_schema()["properties"]["network"]["properties"]
    assert network.dim == schema["dim"]["default"] and network.alpha == schema["alpha"]["default"]
    assert section_defaults("output").metadata.tags == ()


def test_the_readme_recipe_example_is_valid() -> None:
    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text(encoding="utf-8")
    example = readme.split("## A recipe", 1)[1].split("```yaml", 1)[1].split("```", 1)[0]
    validation = validate_recipe_text(example)
    assert validation.errors == (), [str(p) for p in validation.errors]


@pytest.mark.parametrize(
    "parts",
    [(), ("model",), ("dataset", "subsets", 0, "dir"), ("training", "optimizer_args", "betas", 1)],
)
def test_field_paths_round_trip(parts: tuple) -> None:
    from loraforge.recipe.problems import format_path, parse_path

    assert parse_path(format_path(parts)) == parts
