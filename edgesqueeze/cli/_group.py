"""The ``edgesqueeze`` group, the error handling every command shares, and small option helpers.

Every :class:`~edgesqueeze.errors.EdgesqueezeError` becomes one ``error: ...`` line on
stderr and its exit code (1 for a broken budget, 2 for bad usage or input).
"""

from __future__ import annotations

import sys

import click

from edgesqueeze import __version__
from edgesqueeze.errors import EdgesqueezeError


class _Group(click.Group):
    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except EdgesqueezeError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            ctx.exit(exc.exit_code)
        except KeyboardInterrupt:
            click.echo("interrupted", err=True)
            ctx.exit(130)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="edgesqueeze")
def cli() -> None:
    """Make trained PyTorch CNNs small enough for the edge, and prove it.

    \b
    Start here:
      edgesqueeze models                                    list architectures
      edgesqueeze train --recipe recipes/squeezenet-digits.yaml
      edgesqueeze eval artifacts/squeezenet-digits/model.pt
      edgesqueeze info artifacts/squeezenet-digits/model.pt
    """


def _arch_kwargs(num_classes: int | None) -> dict:
    return {"num_classes": num_classes} if num_classes else {}


def _progress_default() -> bool:
    return sys.stderr.isatty()
