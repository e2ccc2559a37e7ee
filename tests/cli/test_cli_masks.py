"""`check` looks at the mask folders of a masked-loss recipe, and `train` stops on the same
findings before it loads anything."""

from __future__ import annotations

import json
from pathlib import Path

from PIL import Image

from .test_cli_findings import run


def test_missing_and_misfit_masks_are_errors_in_check_and_train(tmp_path: Path) -> None:
    (tmp_path / "img").mkdir()
    (tmp_path / "masks").mkdir()
    for name in ("a", "b", "c"):
        Image.new("RGB", (64, 64)).save(tmp_path / "img" / f"{name}.png")
    Image.new("L", (64, 64), 255).save(tmp_path / "masks" / "a.webp")
    Image.new("L", (48, 64), 255).save(tmp_path / "masks" / "b.png")
    (tmp_path / "r.yaml").write_text(
        "model: {base: org/model}\n"
        "dataset:\n"
        "  resolution: 64\n"
        "  min_bucket_reso: 64\n"
        "  subsets:\n"
        "    - dir: img\n"
        "      class_tokens: thing\n"
        "      conditioning_data_dir: masks\n"
        "training: {masked_loss: true, mixed_precision: bf16}\n"
    )
    result = run("check", "r.yaml", "--format", "json", cwd=tmp_path)
    assert result.returncode == 1, result.stderr
    problems = json.loads(result.stdout)[0]["problems"]
    errors = {(p["path"], p["line"]): p["message"] for p in problems if p["severity"] == "error"}
    missing = errors[("dataset.subsets[0].conditioning_data_dir", 8)]
    assert "has no mask for 1 image(s)" in missing and "c.png" in missing
    [size] = [m for (path, _), m in errors.items() if path == "dataset.subsets"]
    assert "b.png is 48x64 but its image b.png is 64x64" in size
    train = run("train", "r.yaml", cwd=tmp_path)
    assert train.returncode == 2 and "c.png" in train.stderr
    assert len(errors) == 2
    # without masked loss the folder is not read: only the warning that it does nothing
    (tmp_path / "r.yaml").write_text(
        (tmp_path / "r.yaml").read_text().replace("masked_loss: true, ", "")
    )
    quiet = json.loads(run("check", "r.yaml", "--format", "json", cwd=tmp_path).stdout)
    found = [(p["severity"], p["path"]) for p in quiet[0]["problems"]]
    assert ("warning", "dataset.subsets[0].conditioning_data_dir") in found
    assert "error" not in {severity for severity, _ in found}
