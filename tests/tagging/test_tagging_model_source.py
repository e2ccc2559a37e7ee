"""Where models come from: local folders, an .onnx path, the hub cache, and the errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraforge.errors import ModelError
from loraforge.tagging import model_source
from loraforge.tagging.model_source import looks_like_hub_id, resolve_tagger


def test_local_folder_and_onnx_path(wd14_dir: Path) -> None:
    files = resolve_tagger(str(wd14_dir))
    assert files.model == wd14_dir / "model.onnx"
    assert files.labels == wd14_dir / "selected_tags.csv"
    assert resolve_tagger(str(wd14_dir / "model.onnx")) == files


def test_folder_missing_labels(wd14_dir: Path) -> None:
    (wd14_dir / "selected_tags.csv").unlink()
    with pytest.raises(ModelError, match=r"lacks selected_tags\.csv"):
        resolve_tagger(str(wd14_dir))


def test_not_a_path_nor_hub_id(tmp_path: Path) -> None:
    with pytest.raises(ModelError, match="no such folder"):
        resolve_tagger(str(tmp_path / "nope"))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("SmilingWolf/wd-v1-4-convnext-tagger-v2", True),
        ("Salesforce/blip-image-captioning-base", True),
        ("./models/tagger", False),
        ("/abs/path", False),
        ("~/x/y", False),
        ("a/b/c", False),
        ("C:\\models\\x", False),
    ],
)
def test_hub_id_shape(text: str, expected: bool) -> None:
    assert looks_like_hub_id(text) is expected


def test_hub_download_uses_the_cache_files(wd14_dir: Path, monkeypatch) -> None:
    import huggingface_hub

    calls = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        calls.append((repo_id, filename))
        return str(wd14_dir / filename)

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    files = resolve_tagger("SmilingWolf/wd-v1-4-convnext-tagger-v2")
    assert files.model == wd14_dir / "model.onnx"
    assert calls == [
        ("SmilingWolf/wd-v1-4-convnext-tagger-v2", "model.onnx"),
        ("SmilingWolf/wd-v1-4-convnext-tagger-v2", "selected_tags.csv"),
    ]


def test_online_failure_says_why(monkeypatch, tmp_path: Path) -> None:
    import huggingface_hub

    class RepositoryNotFoundError(Exception):
        pass

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        raise RepositoryNotFoundError("404 Client Error: Repository Not Found")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr("loraforge.models.hub.hub_reachable", lambda *a, **k: True)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    with pytest.raises(ModelError, match=r"cannot be downloaded .*Repository Not Found") as info:
        model_source.resolve_tagger("someone/missing-tagger", suggest_dir=tmp_path)
    assert str(tmp_path / "missing-tagger") in (info.value.hint or "")


def test_no_network_is_detected_at_once_not_after_retries(monkeypatch, tmp_path: Path) -> None:
    """Without HF_HUB_OFFLINE and without a network the hub client retries each file for ~25 s;
    loraforge finds out with one connection attempt and reads the cache only."""
    import time

    from huggingface_hub import constants

    from loraforge.models import hub

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # nothing listens there
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "empty-cache"))
    monkeypatch.setattr(hub, "_probed", {})
    started = time.monotonic()
    with pytest.raises(ModelError, match="offline") as info:
        model_source.resolve_tagger("SmilingWolf/wd-v1-4-convnext-tagger-v2", suggest_dir=tmp_path)
    assert time.monotonic() - started < 5
    assert "model.onnx, selected_tags.csv" in (info.value.hint or "")
    assert hub._probed == {"http://127.0.0.1:9": False}


def test_cached_files_are_used_when_the_hub_cannot_be_reached(wd14_dir: Path, monkeypatch) -> None:
    import huggingface_hub

    from loraforge.models import hub

    seen = []

    def fake_download(repo_id: str, filename: str, **kwargs) -> str:
        seen.append(kwargs.get("local_files_only"))
        return str(wd14_dir / filename)

    monkeypatch.setattr(hub, "hub_reachable", lambda *a, **k: False)
    monkeypatch.setattr(huggingface_hub, "hf_hub_download", fake_download)
    assert resolve_tagger("SmilingWolf/wd-v1-4-convnext-tagger-v2").model == wd14_dir / "model.onnx"
    assert seen == [True, True]
