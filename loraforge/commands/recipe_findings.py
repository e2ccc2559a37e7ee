"""What is wrong with a recipe, computed once for `loraforge check` and every command that loads one.

:func:`recipe_findings` is the one place findings come from: the recipe's schema and cross-field
rules, what its network backend refuses, its bucket settings, dataset folders and model files,
and what this machine lacks for it. Each finding has the severity ``train`` gives it: an error
makes training stop, a warning does not. ``check`` renders them; :func:`load_checked_recipe`
gives the other commands (``train``, ``train --dry-run``, ``cache``, ``bucket``, ``tag``) the
recipe after printing its warnings once on stderr, or fails listing every error.

Torch-free: ``check`` stays instant.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from rich.text import Text

from loraforge.console import err
from loraforge.recipe import Problem, Recipe, Validation, errors_found, validate_recipe_file
from loraforge.recipe.problems import FIX_PATH_HINT


def recipe_findings(path: Path, *, dataset: bool = True, models: bool = True) -> Validation:
    """Every finding about the recipe at ``path``: its validation with the backend, data and
    machine findings added, in file order (``recipe`` is set when schema and rules pass; the
    added findings may still hold errors).

    Args:
        path: the recipe file.
        dataset: look at the dataset folders and images (``check --no-data`` does not).
        models: check that local model files (``model.base``, ``model.vae``,
            ``network.weights``) exist.

    Raises:
        RecipeError: the file cannot be read at all.
    """
    from loraforge.data.checks import check_dataset
    from loraforge.machine import machine_problems

    validation = validate_recipe_file(path)
    recipe = validation.recipe
    problems = list(validation.problems)
    if recipe is not None:
        found = backend_problems(recipe)
        found += loader_problems(recipe)
        found += architecture_problems(recipe)
        found += check_dataset(
            recipe.dataset, read_files=dataset, masked_loss=recipe.training.masked_loss
        )
        found += model_file_problems(recipe) if models else []
        found += machine_problems(recipe)
        problems += [validation.placed(dataclasses.replace(p, file=str(path))) for p in found]
        problems.sort(key=lambda p: (p.line or 0, p.column or 0))
    return dataclasses.replace(validation, problems=tuple(problems))


def backend_problems(recipe: Recipe) -> list[Problem]:
    """What the chosen network backend refuses (checked without torch)."""
    from loraforge.backends import check_network_config
    from loraforge.errors import RecipeError

    try:
        check_network_config(recipe.network)
    except RecipeError as e:
        # The backend's messages start with the field ("network.dropout: …"): use it as the path.
        field, sep, message = e.message.partition(": ")
        if not (sep and field.startswith("network.") and " " not in field):
            field, message = "network", e.message
        return [Problem("error", message, field, hint=e.hint)]
    return []


def loader_problems(recipe: Recipe) -> list[Problem]:
    """Warnings where the trained file will not load as trained in A1111, ComfyUI or Forge."""
    from loraforge.ops.ui_support import recipe_gaps

    return [
        Problem("warning", message, field, hint=hint)
        for field, message, hint in recipe_gaps(recipe.network, recipe.model.family)
    ]


def architecture_problems(recipe: Recipe) -> list[Problem]:
    """What cannot be built on the model's layer widths (BOFT's block sizes), read from its
    configs without torch. Nothing is said when the architecture cannot be told (an ``auto``
    family with a hub id): training reports it then."""
    n = recipe.network
    if (n.backend, n.algorithm) != ("lycoris", "boft"):
        return []
    from loraforge.backends.lycoris_check import boft_layers, boft_problem
    from loraforge.errors import LoraforgeError
    from loraforge.vram.arch import resolve_architecture
    from loraforge.vram.structure import text_structure, unet_structure

    try:
        arch = resolve_architecture(recipe.model.base, recipe.model.family, vae=recipe.model.vae)
        unet = unet_structure(arch.configs["unet"])
    except (LoraforgeError, ValueError, KeyError):
        return []
    encoders = [
        text_structure(arch.configs[name], projection=name == "text_encoder_2")
        for name in arch.text_encoder_names
    ]
    message = boft_problem(n, boft_layers(n, unet, encoders), arch.family)
    if message is None:
        return []
    hint = "raise network.dim (and conv_dim) to a dim that works, or use diag-oft"
    return [Problem("error", message, "network.dim", hint=hint)]


def model_file_problems(recipe: Recipe) -> list[Problem]:
    """Local model files the recipe names that do not exist (hub ids are not looked up), and
    pickled model weights without ``model.allow_pickle``."""
    from loraforge.models.pickles import PICKLE_HINT, pickle_message, pickled_weights

    files = {
        "model.base": recipe.model.base,
        "model.vae": recipe.model.vae,
        "model.clip_l": recipe.model.clip_l,
        "model.clip_g": recipe.model.clip_g,
        "model.t5xxl": recipe.model.t5xxl,
        "network.weights": recipe.network.weights,
    }
    problems = [
        Problem("error", f"{value} does not exist: train will stop", field, hint=FIX_PATH_HINT)
        # local paths were made absolute when the recipe was read; hub ids were not
        for field, value in files.items()
        if value and Path(value).is_absolute() and not Path(value).exists()
    ]
    for field in ("model.base", "model.vae", "model.clip_l", "model.clip_g", "model.t5xxl"):
        value = files[field]
        pickles = pickled_weights(Path(value)) if value and Path(value).is_absolute() else []
        if pickles and not recipe.model.allow_pickle:
            message = pickle_message(pickles, field).removeprefix(f"{field}: ")
            problems.append(Problem("error", message, field, hint=PICKLE_HINT))
    return problems


def problem_line(problem: Problem) -> Text:
    """``r.yaml:3:1: error: netwrok: unknown key … (hint)``: one line that terminals and
    editors turn into a link to the place (as gcc and ruff print theirs)."""
    colour = "red" if problem.severity == "error" else "yellow"
    text = Text(f"{problem.location}: ")
    text.append(problem.severity, style=f"bold {colour}")
    text.append(f": {problem.path}: " if problem.path else ": ")
    text.append(problem.message)
    if problem.hint:
        text.append(f" ({problem.hint})", style="dim")
    return text


def load_checked_recipe(path: Path, *, dataset: bool = True, models: bool = True) -> Recipe:
    """The recipe for a command that works with it: its warnings (the ones ``check`` shows)
    are printed once on stderr before anything else happens.

    Args:
        path: the recipe file.
        dataset, models: which files the command reads (see :func:`recipe_findings`).

    Raises:
        RecipeError: the recipe has errors (all of them listed, as ``check`` lists them).
    """
    findings = recipe_findings(path, dataset=dataset, models=models)
    if int(os.environ.get("RANK", "0")) == 0:  # once per run, not once per process
        for problem in findings.warnings:
            err.print(problem_line(problem), soft_wrap=True)
    if findings.errors or findings.recipe is None:
        raise errors_found(findings.errors)
    return findings.recipe
