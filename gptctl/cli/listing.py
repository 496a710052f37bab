"""How listings print: a table when it fits the terminal, one record per row when it does not.

Shared by the commands that list things (`runs list`, `ckpt list`); no command module imports
another. A table that does not fit is never cut ("complet…") or broken inside a value: each row
becomes one record of `header value` pairs, wrapped between pairs and indented, so a pipe, a log
or an 80-column terminal shows every field whole.
"""

from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

PLAIN_ABOVE = 200  # rows; rich lays out ~1 ms per row: 17 s for 10,000 checkpoints
GAP = 2


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    if seconds < 86400:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 86400}d{seconds % 86400 // 3600:02d}h"


def format_size(n: int | None) -> str:
    n = n or 0
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:,.1f} {unit}"
    return f"{n} B"


def format_count(n: int | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g}{unit}"
    return str(n)


def natural_width(headers: tuple[str, ...], cells: list[list[str]]) -> int:
    return sum(max(len(c) for c in column) for column in zip(headers, *cells)) + GAP * (len(headers) - 1)


def print_listing(headers: tuple[str, ...], cells: list[list[str]], right: frozenset[str] = frozenset(),
                  console: Console | None = None, extra: tuple[str, list[str]] | None = None) -> None:
    """Print rows as a table when it fits `console`'s width, else as wrapped records.

    `extra` (header, values) is a long column shown only in a table with room to spare, cut with "…"
    to what is left (the full value is in the command's detail view and --json).
    """
    console = console or Console()
    width = natural_width(headers, cells) if cells else 0
    if width > console.width:
        _print_records(headers, cells, console.width)
    elif len(cells) > PLAIN_ABOVE:
        _print_plain(headers, cells, right)
    else:
        table = Table(box=box.SIMPLE_HEAD, collapse_padding=True, pad_edge=False, show_edge=False)
        for name in headers:
            table.add_column(name, no_wrap=True, justify="right" if name in right else "left")
        room = console.width - width - GAP
        if extra and cells and room >= 16:
            table.add_column(extra[0], no_wrap=True, overflow="ellipsis", max_width=room)
            cells = [row + [value] for row, value in zip(cells, extra[1])]
        for row in cells:
            table.add_row(*map(escape, row))
        console.print(table)


def _print_plain(headers: tuple[str, ...], cells: list[list[str]], right: frozenset[str]) -> None:
    widths = [max(len(c) for c in column) for column in zip(headers, *cells)]
    lines = [(" " * GAP).join(c.rjust(w) if h in right else c.ljust(w) for h, c, w in zip(headers, row, widths)).rstrip()
             for row in [list(headers), *cells]]
    print("\n".join(lines))


def _print_records(headers: tuple[str, ...], cells: list[list[str]], width: int) -> None:
    """`header value` pairs, as many per line as fit; the first pair of a record starts the line."""
    lines = []
    for row in cells:
        line = ""
        for header, value in zip(headers, row):
            if not value:  # e.g. "pinned" for a checkpoint that is not: nothing to say
                continue
            pair = f"{header} {value}"
            if not line:
                line = pair
            elif len(line) + GAP + len(pair) <= width:
                line += " " * GAP + pair
            else:
                lines.append(line)
                line = "  " + pair  # a continuation: indented under its record
        lines.append(line)
    print("\n".join(lines))
