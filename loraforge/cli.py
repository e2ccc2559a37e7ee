"""The root of the command line: registers the subcommands and owns the error -> exit-code boundary.

Only this module turns a :class:`~loraforge.errors.LoraforgeError` into a message and exit code 2.
Nothing here imports torch, diffusers or transformers (``loraforge --help`` must be instant).
"""

from __future__ import annotations

import sys
from typing import Annotated

import typer
from rich.markup import escape

from loraforge import __version__
from loraforge.commands import bucket, cache, check, init, merge, report, resize, tag, train
from loraforge.console import err
from loraforge.errors import LoraforgeError

app = typer.Typer(
    name="loraforge",
    help="Train LoRA-family adapters for Stable Diffusion from one YAML recipe.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)


def _flags_without_type() -> None:
    """Show flags as flags in ``--help``: recent typer prints ``--force <bool>`` as if the flag
    took a value. A flag's help row then shows no type (older typer already does that)."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(shown, "_flags_hidden", False):
        return

    def display_type_rich(self: TyperOption, ctx: object) -> str | None:
        return None if self.is_flag and self.metavar is None else shown(self, ctx)

    display_type_rich._flags_hidden = True  # type: ignore[attr-defined]
    TyperOption.display_type_rich = display_type_rich  # type: ignore[method-assign]


_flags_without_type()


def _version(value: bool) -> None:
    if value:
        typer.echo(f"loraforge {__version__}")
        raise typer.Exit()


@app.callback()
def root(
    # read from argv by main() before typer runs; declared here for --help and parsing
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """Train LoRA-family adapters for Stable Diffusion from one YAML recipe.

    A typical session: [bold]loraforge init --preset char-12gb -o recipe.yaml[/], edit it,
    [bold]loraforge check recipe.yaml[/], [bold]loraforge train recipe.yaml[/].
    """


for _name, _module in {
    "init": init,
    "check": check,
    "tag": tag,
    "bucket": bucket,
    "cache": cache,
    "train": train,
    "resize": resize,
    "merge": merge,
    "report": report,
}.items():
    app.command(_name, help=_module.command.__doc__)(_module.command)


def _click_exception_types() -> tuple[type[BaseException], ...]:
    """Click's exception base class, from the click typer uses (recent typer bundles its own)."""
    types: list[type[BaseException]] = []
    for module in ("typer._click.exceptions", "click.exceptions"):
        try:
            types.append(__import__(module, fromlist=["ClickException"]).ClickException)
        except ImportError:
            continue
    return tuple(types)


def run(argv: list[str] | None = None) -> int:
    """Run the CLI and return its exit code: user errors print one message and give 2,
    usage errors 2, Ctrl-C 130. ``--debug`` lets user errors raise with their traceback."""
    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        code = app(args=argv, standalone_mode=False, prog_name="loraforge")
    except LoraforgeError as e:
        if debug:
            raise
        err.print(f"[bold red]error:[/] {escape(e.message)}")
        if e.hint:
            err.print(f"  [cyan]hint:[/] {escape(e.hint)}")
        return e.exit_code
    except (KeyboardInterrupt, typer.Abort):
        err.print("interrupted")
        return 130
    except _click_exception_types() as e:  # usage errors: bad option, missing argument (exit 2)
        e.show()
        return e.exit_code
    except SystemExit as e:  # typer.Exit raised outside a command (--version)
        return int(e.code or 0)
    # Without standalone mode click returns (not raises) the code of `typer.Exit(code)`.
    return code if isinstance(code, int) else 0


def main(argv: list[str] | None = None) -> None:
    """Console-script entry point: :func:`run`, then exit with its code."""
    sys.exit(run(argv))
