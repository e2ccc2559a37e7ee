"""The captioner path with a tiny BLIP built from a config, against transformers called directly."""

from __future__ import annotations

from pathlib import Path

import pytest
from PIL import Image
from rich.console import Console

from loraforge.data.images import load_image_rgb
from loraforge.errors import ModelError
from loraforge.tagging import folder_from_path, load_annotator, run_tagging
from loraforge.tagging.model_source import resolve_captioner


def make_images(folder: Path) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(250, 10, 10), (10, 10, 250), (30, 200, 30)]
    paths = []
    for i, colour in enumerate(colours):
        path = folder / f"img{i}.png"
        Image.new("RGB", (24 + 8 * i, 20), colour).save(path)
        paths.append(path)
    return paths


def reference_captions(blip_dir: Path, paths: list[Path], **generate) -> list[str]:
    """transformers directly: processor -> generate -> batch_decode (one batch)."""
    import torch
    from transformers import BlipForConditionalGeneration, BlipProcessor

    processor = BlipProcessor.from_pretrained(blip_dir)
    model = BlipForConditionalGeneration.from_pretrained(blip_dir).eval()
    inputs = processor(images=[load_image_rgb(p) for p in paths], return_tensors="pt")
    if generate.get("do_sample"):
        torch.manual_seed(generate.pop("seed"))
    with torch.no_grad():
        ids = model.generate(pixel_values=inputs["pixel_values"], **generate)
    return [" ".join(t.split()) for t in processor.batch_decode(ids, skip_special_tokens=True)]


def caption_run(folder: Path, config) -> dict[str, str]:
    annotator = load_annotator(config)
    console = Console(stderr=True, quiet=True)
    selection = folder_from_path(folder)
    run_tagging(selection.folders, annotator, config, console=console, show_progress=False)
    return {
        p.stem: p.read_text(encoding="utf-8").rstrip("\n") for p in sorted(folder.glob("*.txt"))
    }


@pytest.fixture
def captioner_config(tagging_config, blip_dir):
    def make(**overrides):
        fields = {"mode": "captioner", "model": str(blip_dir), "max_length": 6, **overrides}
        return tagging_config(**fields)

    return make


def test_greedy_captions_match_transformers(tmp_path, blip_dir, captioner_config) -> None:
    paths = make_images(tmp_path / "imgs")
    got = caption_run(tmp_path / "imgs", captioner_config(trigger_word="sks", batch_size=8))
    expected = reference_captions(blip_dir, paths, max_new_tokens=6, num_beams=1, do_sample=False)
    assert all(expected)
    assert got == {p.stem: f"sks, {e}" for p, e in zip(paths, expected, strict=True)}
    assert all(len(e.split()) == 6 for e in expected)  # max_length caps the new tokens


def test_beam_search_matches_transformers(tmp_path, blip_dir, captioner_config) -> None:
    paths = make_images(tmp_path / "imgs")
    got = caption_run(tmp_path / "imgs", captioner_config(num_beams=3, max_length=4))
    expected = reference_captions(blip_dir, paths, max_new_tokens=4, num_beams=3, do_sample=False)
    assert got == {p.stem: e for p, e in zip(paths, expected, strict=True)}


def test_nucleus_sampling_is_seeded(tmp_path, blip_dir, captioner_config) -> None:
    paths = make_images(tmp_path / "imgs")
    config = captioner_config(top_p=0.9, seed=123, existing_captions="overwrite")
    first = caption_run(tmp_path / "imgs", config)
    assert caption_run(tmp_path / "imgs", config) == first
    expected = reference_captions(
        blip_dir, paths, max_new_tokens=6, do_sample=True, top_p=0.9, top_k=0, seed=123
    )
    assert first == {p.stem: e for p, e in zip(paths, expected, strict=True)}


def test_replacements_apply_to_sentences(tmp_path, blip_dir, captioner_config) -> None:
    paths = make_images(tmp_path / "imgs")
    plain = reference_captions(blip_dir, paths[:1], max_new_tokens=6, do_sample=False)[0]
    word = plain.split()[0]
    got = caption_run(tmp_path / "imgs", captioner_config(replace_tags={word: "zebra"}))
    expected = " ".join("zebra" if w == word else w for w in plain.split())
    assert got["img0"] == expected


def test_captioner_via_cli(tmp_path, blip_dir) -> None:
    from loraforge.cli import main

    make_images(tmp_path / "data" / "3_thing")
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        "model:\n  base: x/y\ndataset:\n  subsets:\n    - dir: data\n"
        f"tagging:\n  mode: captioner\n  model: {blip_dir}\n  device: cpu\n"
        "  max_length: 5\n  trigger_word: sks\n",
        encoding="utf-8",
    )
    try:
        main(["tag", str(recipe), "--format", "json"])
    except SystemExit as e:
        assert e.code == 0
    caption = (tmp_path / "data" / "3_thing" / "img0.txt").read_text(encoding="utf-8")
    assert caption.startswith("sks, ") and len(caption.split()) == 6
    assert (tmp_path / "output" / "tag_frequency.json").exists()


def test_captioner_folder_errors(tmp_path) -> None:
    with pytest.raises(ModelError, match=r"has no config\.json"):
        resolve_captioner(str(tmp_path))
    not_a_model = tmp_path / "m"
    not_a_model.mkdir()
    (not_a_model / "config.json").write_text('{"model_type": "bert"}', encoding="utf-8")
    from loraforge.tagging.captioner import ImageCaptioner

    with pytest.raises(ModelError, match="cannot load an image-to-text model"):
        ImageCaptioner(not_a_model, _cpu_config())


def _cpu_config():
    from loraforge.recipe import parse_recipe_text

    recipe = parse_recipe_text(
        "model:\n  base: a/b\ndataset:\n  subsets:\n    - dir: d\ntagging:\n  device: cpu\n"
    )
    return recipe.tagging


def test_offline_hub_captioner(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ModelError, match="offline") as info:
        resolve_captioner("Salesforce/blip-image-captioning-base", suggest_dir=tmp_path)
    assert str(tmp_path / "blip-image-captioning-base") in (info.value.hint or "")


def test_git_decoder_only_captioner_matches_transformers(tmp_path, git_dir, tagging_config) -> None:
    import torch
    from transformers import GitForCausalLM, GitProcessor

    paths = make_images(tmp_path / "imgs")
    config = tagging_config(mode="captioner", model=str(git_dir), max_length=5)
    got = caption_run(tmp_path / "imgs", config)
    processor = GitProcessor.from_pretrained(git_dir)
    model = GitForCausalLM.from_pretrained(git_dir).eval()
    pixels = processor(images=[load_image_rgb(p) for p in paths], return_tensors="pt")
    with torch.no_grad():
        ids = model.generate(pixel_values=pixels["pixel_values"], max_new_tokens=5)
    expected = [" ".join(t.split()) for t in processor.batch_decode(ids, skip_special_tokens=True)]
    assert all(expected)
    assert got == {p.stem: e for p, e in zip(paths, expected, strict=True)}
