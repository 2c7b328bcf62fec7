"""What a failed command prints: click's usage errors and the user mistakes the library raises, as one line.

typer bundles its own click (``typer._click``), so a plain ``except click.ClickException`` misses its
errors; the classes are collected from every click that is importable.
"""

from __future__ import annotations

import importlib


def click_errors() -> tuple[tuple[type, ...], tuple[type, ...]]:
    """(ClickException, Abort) classes of every click that can be in play.

    typer >= 0.20 bundles its own copy of click (``typer._click``, with ``Abort`` in ``typer.exceptions``),
    whose exceptions are not the installed click's: an ``except click.ClickException`` alone never matches.
    """
    found: dict[str, list[type]] = {"ClickException": [], "Abort": []}
    for name in ("typer._click.exceptions", "typer.exceptions", "click.exceptions"):
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        for kind, classes in found.items():
            if hasattr(module, kind):
                classes.append(getattr(module, kind))
    return tuple(found["ClickException"]), tuple(found["Abort"])


def usage_line(exc) -> str:
    """click's usage error as one line: what was wrong, and where the allowed forms are."""
    ctx = getattr(exc, "ctx", None)
    message = " ".join(exc.format_message().split())
    if ctx is None:  # not a usage error (click's FileError, say): its message alone
        return message
    where = ctx.command_path
    if type(exc).__name__ == "NoArgsIsHelpError":  # `gradwatch` alone: click's message is the whole help
        commands = ", ".join(sorted(ctx.command.list_commands(ctx)))
        return f"{where}: got no command; allowed: {commands} (see {where} --help)"
    return f"{where}: {message} (see {where} --help)"


def user_error(exc: BaseException) -> str | None:
    """The one line a user mistake prints, or None for a bug (which keeps its traceback)."""
    import sqlite3

    from gradwatch.spec import SpecError

    if isinstance(exc, SpecError | KeyError):
        return str(exc.args[0]) if exc.args else type(exc).__name__
    if isinstance(exc, OSError):
        return f"{exc.filename or ''}: {exc.strerror or exc}".lstrip(": ")
    if isinstance(exc, sqlite3.DatabaseError):
        return f"store: {str(exc).splitlines()[0]}; allowed: a gradwatch SQLite store (--store or $GRADWATCH_STORE)"
    return None
