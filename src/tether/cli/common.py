"""What every command shares: the context object, app loading, output and JSON arguments.

Command modules import this one at their top, so it must stay cheap: ``rich``, SQLAlchemy,
``tether.app`` and ``tether.store`` are imported inside the functions that need them, never
here (``tether --help`` imports every command module to list them).
"""

from __future__ import annotations

import functools
import importlib
import json
import os
import sys
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

import click

from tether.errors import ConfigurationError

if TYPE_CHECKING:
    from rich.console import Console

    from tether.app import App

OUTPUTS = ("table", "json", "jsonl", "ids")
"""The values of ``-o/--output``."""


def error(message: str) -> None:
    """Print one ``error: ...`` line on stderr."""
    click.echo(f"error: {' '.join(message.splitlines()).strip()}", err=True)


def warn(message: str) -> None:
    """Print one ``warning: ...`` line on stderr."""
    click.echo(f"warning: {message}", err=True)


class OrderedGroup(click.Group):
    """A group whose help lists commands in the order they were added, not alphabetically."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        """Command names in declaration order."""
        return list(self.commands)


# -- the context object ------------------------------------------------------------------


@dataclass
class CliState:
    """The root options, and the ``App`` built from them on first use.

    Attributes:
        url: ``--db`` or ``TETHER_DATABASE_URL``; ``None`` when neither was given.
        app_ref: ``--app`` or ``TETHER_APP`` (``module:attr``); ``None`` when not given.
    """

    url: str | None = None
    app_ref: str | None = None
    _app: App | None = field(default=None, repr=False)

    @property
    def has_user_app(self) -> bool:
        """True when the user's code (and so its hooks) was loaded with ``--app``."""
        return self.app_ref is not None

    def get_app(self) -> App:
        """The user's App (``--app``) pointed at ``--db`` if given, else a bare one on the URL."""
        if self._app is None:
            if self.app_ref is not None:
                app = load_app(self.app_ref)
                if self.url is not None and self.url != app.url:
                    app.close()  # reopen on the URL the user chose on the command line
                    app.url = self.url
            else:
                from tether.app import App

                app = App(self.url, require_types=False)
            self._app = app
        return self._app

    def database_url(self) -> str | None:
        """The URL commands should open: ``--db``/env, else the ``--app``'s own URL."""
        if self.url is None and self.app_ref is not None:
            return self.get_app().url
        return self.url

    def close(self) -> None:
        """Release the database connections, if any were opened."""
        if self._app is not None:
            self._app.close()


pass_state = click.make_pass_decorator(CliState, ensure=True)
"""Decorator passing the ``CliState`` as a command's first argument."""


def target_options(*, app: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Accept ``--db`` (and ``--app``) after the command name too, as in
    ``tether worker --app myagents:app --db URL``; they win over the root options."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(
            *args: Any, local_url: str | None, local_app: str | None = None, **kwargs: Any
        ) -> Any:
            state = click.get_current_context().ensure_object(CliState)
            if local_url:
                state.url = local_url
            if local_app:
                state.app_ref = local_app
            return fn(*args, **kwargs)

        wrapper = click.option(
            "--db", "local_url", metavar="URL", help="Database URL (same as tether --db)."
        )(wrapper)
        if app:
            wrapper = click.option(
                "--app",
                "local_app",
                metavar="MODULE:ATTR",
                help="Your tether.App, with its agent types (same as tether --app).",
            )(wrapper)
        return wrapper

    return decorate


def load_app(ref: str) -> App:
    """Import ``module:attr`` (from the working directory first) and return that ``tether.App``.

    Raises:
        ConfigurationError: (exit 2) a malformed reference, a missing module or attribute, a
            module that fails to import, or an attribute that is not a ``tether.App``.
    """
    from tether.app import App

    module_name, _, attr = ref.partition(":")
    if not module_name or not attr:
        raise ConfigurationError(
            f"--app {ref!r} must look like module:attribute, e.g. myagents:app"
        )
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        name = getattr(exc, "name", None) if isinstance(exc, ModuleNotFoundError) else None
        if name is not None and (module_name + ".").startswith(name + "."):
            raise ConfigurationError(
                f"--app {ref}: no module named {module_name!r} in {cwd} or on sys.path"
            ) from None
        raise ConfigurationError(
            f"--app {ref}: importing {module_name} failed: {_describe(exc)}"
        ) from None
    value: Any = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise ConfigurationError(
                f"--app {ref}: module {module_name} has no attribute {attr!r}"
            ) from None
    if not isinstance(value, App):
        raise ConfigurationError(
            f"--app {ref}: {attr} is of type {type(value).__name__}, not a tether.App; point "
            "--app at the object created with tether.App(...)"
        )
    return value


def _describe(exc: BaseException) -> str:
    """``Type: message (file:line)`` of the innermost frame, on one line."""
    where = ""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    if tb is not None:
        where = f" ({Path(tb.tb_frame.f_code.co_filename).name}:{tb.tb_lineno})"
    return f"{type(exc).__name__}: {exc}{where}"


# -- JSON arguments ----------------------------------------------------------------------


if TYPE_CHECKING:
    _ParamType = click.ParamType[Any, Any]
else:  # click < 8.2 has no type parameters here
    _ParamType = click.ParamType


class JsonParam(_ParamType):
    """A JSON argument given inline or as ``@path/to/file.json``.

    Args:
        object_only: refuse anything but a JSON object.
    """

    name = "json"

    def __init__(self, *, object_only: bool = False) -> None:
        self.object_only = object_only

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        """Parse the text (or the file named after ``@``) as JSON."""
        if not isinstance(value, str):
            return value
        text = value
        if value.startswith("@"):
            try:
                text = Path(value[1:]).read_text(encoding="utf-8")
            except OSError as exc:
                self.fail(f"cannot read {value[1:]}: {exc.strerror}", param, ctx)
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            self.fail(f"not valid JSON ({exc}): {_clip(text)}", param, ctx)
        if self.object_only and not isinstance(parsed, dict):
            self.fail(
                f"expected a JSON object like '{{\"key\": 1}}', got {_clip(text)}", param, ctx
            )
        return parsed


def _clip(text: str, limit: int = 60) -> str:
    text = " ".join(text.split())
    return repr(text if len(text) <= limit else text[: limit - 3] + "...")


JSON_OBJECT = JsonParam(object_only=True)
"""A JSON object argument (inline or ``@file``)."""


# -- output --------------------------------------------------------------------------------


class Record(Protocol):
    """Anything with a JSON form: tether's records (``AgentInfo``, ``RunInfo``, ...)."""

    def to_dict(self) -> dict[str, Any]:
        """The record as JSON-ready values."""
        ...


class Row:
    """A plain dict passed where a record is expected (e.g. a table with derived columns)."""

    def __init__(self, values: dict[str, Any]) -> None:
        self.values = values

    def to_dict(self) -> dict[str, Any]:
        """The values as given."""
        return self.values


Column = tuple[str, str]
"""(header, key in the record's ``to_dict()``) for table output."""


def output_option(*, ids: bool = True) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add ``-o/--output`` and ``--json`` to a command; it receives one ``output`` argument.

    Args:
        ids: offer ``-o ids`` (only for records that have an id).
    """
    choices = [o for o in OUTPUTS if ids or o != "ids"]

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, output: str, as_json: bool, **kwargs: Any) -> Any:
            if as_json and output not in ("table", "json"):
                raise click.UsageError("give either --json or -o/--output, not both")
            return fn(*args, output="json" if as_json else output, **kwargs)

        options = [
            click.option(
                "-o",
                "--output",
                type=click.Choice(choices, case_sensitive=False),
                default="table",
                show_default=True,
                help="Output format: a table for people, JSON for scripts.",
            ),
            click.option("--json", "as_json", is_flag=True, help="Same as -o json."),
        ]
        for option in reversed(options):
            wrapper = option(wrapper)
        return wrapper

    return decorate


def limit_option(
    *, default: int | None = None, help: str = "At most this many."
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Add ``--limit N`` (at least 1) to a listing command; it receives one ``limit`` argument.

    Args:
        default: the limit when none is given (``None``: no limit).
        help: the option's help text.
    """
    return click.option(
        "--limit",
        type=click.IntRange(min=1),
        default=default,
        show_default=default is not None,
        help=help,
    )


def emit(
    records: Iterable[Record],
    output: str,
    columns: Sequence[Column],
    *,
    id_key: str | None = None,
    title: str | None = None,
) -> None:
    """Print records to stdout as a table, a JSON array, JSON lines or ids.

    JSON is never truncated and an empty list prints ``[]``.
    """
    rows = [r.to_dict() for r in records]
    if output == "json":
        click.echo(dump_json(rows))
    elif output == "jsonl":
        for row in rows:
            click.echo(compact_json(row))
    elif output == "ids":
        if id_key is None:
            raise click.UsageError("-o ids is not available here")
        for row in rows:
            click.echo(str(row[id_key]))
    else:
        _print_table(rows, columns, title)


def emit_one(record: Record, output: str, *, id_key: str | None = None) -> None:
    """Print one record: a two-column table, a JSON object, one JSON line, or its id."""
    row = record.to_dict()
    if output == "json":
        click.echo(dump_json(row))
    elif output == "jsonl":
        click.echo(compact_json(row))
    elif output == "ids":
        if id_key is None:
            raise click.UsageError("-o ids is not available here")
        click.echo(str(row[id_key]))
    else:
        from rich.table import Table
        from rich.text import Text

        table = Table(show_header=False, box=None, pad_edge=False)
        table.add_column(style="bold")
        table.add_column(overflow="fold")
        for key, value in row.items():
            table.add_row(key, Text(cell(value, pretty=True)))  # Text: values are no markup
        console().print(table)


def dump_json(value: Any) -> str:
    """Indented JSON text, non-ASCII kept as is."""
    return json.dumps(value, indent=2, ensure_ascii=False)


def compact_json(value: Any) -> str:
    """JSON on one line without spaces after separators, non-ASCII kept as is."""
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def cell(value: Any, *, pretty: bool = False) -> str:
    """A value as table text: ``-`` for null, times to the second, JSON for documents."""
    if value is None:
        return "-"
    if isinstance(value, Mapping | list):
        return json.dumps(value, indent=2 if pretty and value else None, ensure_ascii=False)
    text = str(value)
    if len(text) > 20 and text[10:11] == "T" and text.endswith("Z"):
        return text[:19] + "Z"  # an RFC 3339 time: tables show it to the second
    return text


def console() -> Console:
    """A rich console on stdout (created per call, so test runners can capture it)."""
    from rich.console import Console

    return Console(highlight=False)


def _print_table(rows: list[dict[str, Any]], columns: Sequence[Column], title: str | None) -> None:
    from rich import box
    from rich.table import Table
    from rich.text import Text

    if not rows:
        click.echo("(none)", err=True)
        return
    cells = [[cell(row.get(key)) for _, key in columns] for row in rows]
    table = Table(
        title=title,
        title_justify="left",
        box=box.SIMPLE_HEAD,
        show_edge=False,
        padding=(0, 1, 0, 0),
    )
    for header, _ in columns:
        table.add_column(header, overflow="fold")  # fold, never cut: a table hides no data
    for line in cells:
        table.add_row(*(Text(text) for text in line))  # a value like "[urgent]" is no markup
    console().print(table)
