"""How long `loraforge check` takes on very large recipes, and whether it grows linearly.

Generates, in a temporary folder, recipes with N subsets (each folder holding one image),
N sample prompts and a tag list of N entries, and times `check_recipe` (what `loraforge check`
computes: YAML, schema, defaults, paths, cross-field rules, dataset folders; not the rendering)
at N and N/10. Printed, all measured in this one run:

- seconds (wall and CPU) for each recipe at both sizes;
- the growth factor from N/10 to N (10 for linear work; 100 would be quadratic).

The target (issue 17): 5,000 subsets check in under 1 s on the CI machine kind (2 CPU cores).
Usage:

    python benchmarks/check_speed.py                 # N = 5000 subsets, 20000 prompts
    python benchmarks/check_speed.py --subsets 20000 --prompts 50000 --tags 180000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from PIL import Image


def subsets_recipe(root: Path, count: int) -> Path:
    image = root / "one.png"
    Image.new("RGB", (64, 64), (120, 30, 200)).save(image)
    lines = ["model: {base: org/model}", "dataset:", "  subsets:"]
    for i in range(count):
        folder = root / "data" / f"1_thing{i}"
        folder.mkdir(parents=True, exist_ok=True)
        target = folder / "a.png"
        if not target.exists():
            target.hardlink_to(image)
        lines += [f"    - dir: data/1_thing{i}", "      shuffle_caption: true"]
    return _write(root / f"subsets-{count}.yaml", lines)


def prompts_recipe(root: Path, count: int) -> Path:
    lines = ["model: {base: org/model}", "dataset: {subsets: [{dir: data/1_thing0}]}"]
    lines += ["sample:", "  every_n_epochs: 1", "  prompts:"]
    lines += [f"    - prompt: a photo of thing {i}, best quality" for i in range(count)]
    return _write(root / f"prompts-{count}.yaml", lines)


def tags_recipe(root: Path, count: int) -> Path:
    lines = ["model: {base: org/model}", "dataset: {subsets: [{dir: data/1_thing0}]}"]
    lines += ["tagging:", "  undesired_tags:"]
    lines += [f"    - some_tag_name_{i}" for i in range(count)]
    return _write(root / f"tags-{count}.yaml", lines)


def _write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def timed(path: Path) -> tuple[float, float]:
    from loraforge.commands.check import check_recipe

    wall, cpu = time.perf_counter(), time.process_time()
    report = check_recipe(path)
    assert not [p for p in report.problems if p.severity == "error"], report.problems[:3]
    return time.perf_counter() - wall, time.process_time() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subsets", type=int, default=5000)
    parser.add_argument("--prompts", type=int, default=20000)
    parser.add_argument("--tags", type=int, default=180000, help="about 4.8 MB of YAML")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="loraforge-check-bench-") as tmp:
        root = Path(tmp)
        subsets_recipe(root, 1)
        timed(subsets_recipe(root, 10))  # imports and caches, not measured
        print(f"{'recipe':<24}{'N':>8}{'wall s':>9}{'cpu s':>9}{'N/10 wall s':>13}{'growth':>8}")
        for make, count in (
            (subsets_recipe, args.subsets),
            (prompts_recipe, args.prompts),
            (tags_recipe, args.tags),
        ):
            small = timed(make(root, count // 10))
            large = timed(make(root, count))
            name = make.__name__.removesuffix("_recipe")
            growth = large[1] / max(small[1], 1e-9)
            print(
                f"{name:<24}{count:>8}{large[0]:>9.2f}{large[1]:>9.2f}{small[0]:>13.2f}"
                f"{growth:>8.1f}"
            )


if __name__ == "__main__":
    main()
