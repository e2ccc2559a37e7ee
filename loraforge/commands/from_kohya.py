"""`loraforge init --from-kohya`: turn an sd-scripts / kohya_ss config into a recipe."""

from __future__ import annotations

from pathlib import Path

from loraforge.errors import RecipeError


def write_recipe_from_kohya(
    config_path: Path, output: Path, *, dataset_config: Path | None, force: bool
) -> None:
    """Convert ``config_path`` (sd-scripts ``--config_file`` TOML or kohya_ss JSON, with its
    ``--dataset_config`` TOML) into ``output``, and say what could not be converted.

    Raises:
        RecipeError: the config cannot be read.
        OutputExistsError: ``output`` exists and ``force`` is false.
    """
    import yaml
    from rich.markup import escape

    from loraforge.console import info, out, warn
    from loraforge.fileio import write_text_atomic
    from loraforge.recipe.kohya_convert import convert_kohya, flatten_config, read_config

    try:
        config = flatten_config(read_config(config_path))
    except (OSError, ValueError) as e:  # tomllib/json errors are ValueErrors
        raise RecipeError(
            f"cannot read the kohya config {config_path}: {e}",
            hint="pass an sd-scripts --config_file .toml or a kohya_ss .json",
        ) from e
    conversion = convert_kohya(config, config_path.parent, dataset_config)
    lines = [f"# converted from {config_path.name} by loraforge init --from-kohya"]
    if conversion.unmapped:
        lines.append("# not converted (no loraforge equivalent, or not understood):")
        lines += [f"#   {key}: {value!r} ({why})" for key, value, why in conversion.unmapped]
    body = yaml.safe_dump(conversion.recipe, sort_keys=False, allow_unicode=True)
    write_text_atomic(output, "\n".join(lines) + "\n" + body, force=force)
    for note in conversion.notes:
        info(note)
    if conversion.unmapped:
        warn(f"{len(conversion.unmapped)} option(s) were not converted:")
        for key, value, why in conversion.unmapped:
            out.print(f"  {escape(key)} = {escape(repr(value))}: {escape(why)}")
    info(f"wrote {output} from {config_path.name}; next: loraforge check {output}")
