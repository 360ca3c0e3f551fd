"""The ``liveclone`` command: one module per subcommand, errors mapped to exit codes here."""

from __future__ import annotations

import errno
import importlib
import os
import sys

import click

from liveclone import __version__
from liveclone.errors import LivecloneError, MissingDependencyError, NoSpaceError

# A top-level module that may be missing → how to get it. boto3 is the ``s3`` extra;
# everything else liveclone imports is an ordinary dependency, so its absence means
# a broken install.
_EXTRAS = {"boto3": "s3", "botocore": "s3", "s3transfer": "s3", "jmespath": "s3"}

# Subcommand → (module in liveclone.cli, its click command). Imported only when the
# command runs, so start-up (and `serve`'s time to first read) stays short.
COMMANDS = {
    "clone": ("clone", "command"),
    "status": ("status", "command"),
    "pause": ("pause", "pause"),
    "resume": ("pause", "resume"),
    "serve": ("serve", "command"),
    "mount": ("mount", "command"),
    "boot": ("boot", "command"),
    "libvirt-xml": ("libvirt_xml", "command"),
    "daemon": ("daemon", "command"),
    "add": ("clones", "add"),
    "ls": ("clones", "ls"),
    "rm": ("clones", "rm"),
    "verify": ("verify", "command"),
}


class _Group(click.Group):
    """Loads subcommands lazily; turns LivecloneError into its message and exit code,
    never a traceback."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return list(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module_name, attribute = COMMANDS[name]
        module = importlib.import_module(f"liveclone.cli.{module_name}")
        command: click.Command = getattr(module, attribute)
        return command

    def invoke(self, ctx: click.Context) -> object:
        try:
            return super().invoke(ctx)
        except LivecloneError as e:
            click.echo(f"liveclone: error: {e.message}", err=True)
            sys.exit(e.exit_code)
        except ModuleNotFoundError as e:
            _debug_traceback()
            click.echo(f"liveclone: error: {missing_module_message(e.name)}", err=True)
            sys.exit(MissingDependencyError.exit_code)
        except OSError as e:
            # An unexpected system error: name it and where; the traceback only on request.
            _debug_traceback()
            where = f" ({e.filename})" if e.filename else ""
            code = NoSpaceError.exit_code if e.errno in (errno.ENOSPC, errno.EDQUOT) else 1
            click.echo(f"liveclone: error: {e.strerror or e}{where}", err=True)
            sys.exit(code)


def _debug_traceback() -> None:
    """The traceback of the error being handled, when LIVECLONE_DEBUG asks for it."""
    if os.environ.get("LIVECLONE_DEBUG"):
        import traceback  # only then: it costs start-up time

        traceback.print_exc()


def missing_module_message(name: str | None) -> str:
    """One line for a Python module that could not be imported, naming what to install."""
    top = (name or "?").partition(".")[0]
    extra = _EXTRAS.get(top)
    if extra:
        return (f"the Python package {top} is not installed; it comes with "
                f"liveclone's {extra} extra: pip install 'liveclone[{extra}]'")
    return (f"the Python package {top}, which liveclone needs, is not installed; "
            "reinstall liveclone: pip install --force-reinstall liveclone")


@click.group(cls=_Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="liveclone")
def cli() -> None:
    """Clone a disk image and use the clone at once, while it is being copied."""


def main() -> None:
    cli()


if __name__ == "__main__":
    main()
