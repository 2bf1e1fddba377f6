"""``prumerge-export``: a thin click layer. Each command parses options, calls one library function, prints.

Imports of torch-heavy modules happen inside the commands, so ``--help`` and torch-free commands start fast.
"""

from __future__ import annotations

import sys

import click

from . import __version__
from .errors import PruMergeError


class _Group(click.Group):
    """Turns every PruMergeError into one line on stderr and its exit code, instead of a traceback."""

    def invoke(self, ctx):
        try:
            return super().invoke(ctx)
        except PruMergeError as exc:
            click.secho(f"error: {exc}", fg="red", err=True)
            sys.exit(exc.exit_code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="prumerge-export")
def main() -> None:
    """Export LLaVA-style vision towers with the PruMerge / PruMerge+ token reducer inside the graph."""


if __name__ == "__main__":  # pragma: no cover
    main()
