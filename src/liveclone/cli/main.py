"""The ``liveclone`` command: one module per subcommand, errors mapped to exit codes here."""

from __future__ import annotations

import errno
import os
import sys
import traceback

import click

from liveclone import __version__
from liveclone.errors import LivecloneError, NoSpaceError


class _Group(click.Group):
    """Turns LivecloneError into its message and exit code, never a traceback."""

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except LivecloneError as e:
            click.echo(f"liveclone: error: {e.message}", err=True)
            sys.exit(e.exit_code)
        except OSError as e:
            # An unexpected system error: name it and where; the traceback only on request.
            if os.environ.get("LIVECLONE_DEBUG"):
                traceback.print_exc()
            where = f" ({e.filename})" if e.filename else ""
            code = NoSpaceError.exit_code if e.errno in (errno.ENOSPC, errno.EDQUOT) else 1
            click.echo(f"liveclone: error: {e.strerror or e}{where}", err=True)
            sys.exit(code)


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="liveclone")
def cli() -> None:
    """Clone a disk image and use the clone at once, while it is being copied."""


def _register() -> None:
    from liveclone.cli import boot, clone, mount, serve, status

    for module in (clone, status, mount, boot, serve):
        cli.add_command(module.command)


_register()


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
