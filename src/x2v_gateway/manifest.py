"""Reading a batch manifest: CSV with a header, or JSON Lines, one job per row.

The dashboard's batch form (batch_plan.py, on the gateway) and `x2v-gateway submit`
(client/plan.py, on a laptop) read the same manifests and must agree on every row. This module
uses the standard library only, so the client shares it without the server's dependencies.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")
# Cells that name a file (tasks.INPUT_ROLES: `video` is animate's driving video); the other columns are parameters.
FILE_COLUMNS = ("image", "audio", "last_frame", "video")


class TooManyRows(Exception):
    """The manifest has more rows than a batch may have jobs; raised at the first row past it."""


@dataclass
class Row:
    where: str  # "line 3": what the user finds in their editor
    values: dict[str, Any]
    problems: list[str] = field(default_factory=list)


def read_rows(text: str, columns: tuple[str, ...], limit: int | None = None) -> tuple[list[Row], list[str]]:
    """The rows of a manifest, and what is wrong with the manifest as a whole.

    A row's own mistakes (bad JSON, an unknown key, too many cells) are in its `problems`, so one
    answer names them all. With a `limit`, raises TooManyRows at the row past it, before reading
    the rest.
    """
    rows: list[Row] = []
    if not text.strip():
        return rows, ["is empty: write CSV rows (with a header) or JSON Lines"]
    if text.lstrip().startswith("{"):
        for number, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                _check_room(rows, limit)
                rows.append(_json_row(f"line {number}", line, columns))
        return rows, []
    reader = csv.DictReader(io.StringIO(text.strip() + "\n"), skipinitialspace=True)
    header = [(h or "").strip().lower() for h in reader.fieldnames or []]
    if unknown := [h for h in header if h not in columns]:
        return rows, [
            "has a header naming columns it cannot have: " + ", ".join(map(repr, unknown))
            + "; columns can be: " + ", ".join(columns)
        ]
    reader.fieldnames = header
    for cells in reader:
        _check_room(rows, limit)
        row = Row(f"line {reader.line_num}", {})
        if None in cells:  # more cells than the header has
            row.problems.append(f"{len(header) + len(cells[None])} cells but the header names {len(header)}: check the commas")
            del cells[None]
        row.values = {k: (v or "").strip() for k, v in cells.items()}
        rows.append(row)
    return rows, [] if rows else ["has a header but no rows"]


def take_files(
    row: Row, task: str, needed: tuple[str, ...], named: Mapping[str, T], missing: str,
    fallback: Callable[[str], T | None] = lambda name: None,
) -> dict[str, T]:
    """Pop the row's file cells and find each file: in `named` as typed, then ignoring case
    (spreadsheets like to change case), then through `fallback`. A cell the task needs but is
    empty, a cell it takes no file for, or a file not found (`missing`, with {name}) is a
    problem of the row."""
    by_lower = {name.lower(): item for name, item in named.items()}
    files: dict[str, T] = {}
    for role in FILE_COLUMNS:
        name = str(row.values.pop(role, "") or "").strip()
        if not name:
            if role in needed:
                row.problems.append(f"no {role}: {task} jobs need " + " and ".join(needed))
        elif role not in needed:
            row.problems.append(f"{task} jobs take no {role}: empty the {role} cell, or choose another task type")
        elif (found := named.get(name) or by_lower.get(name.lower()) or fallback(name)) is None:
            row.problems.append(missing.format(name=name))
        else:
            files[role] = found
    return files


def _json_row(where: str, line: str, columns: tuple[str, ...]) -> Row:
    try:
        values = json.loads(line)
    except ValueError as exc:
        return Row(where, {}, [f"not valid JSON ({exc.args[0].split(':')[0]}): fix this line"])
    if not isinstance(values, dict):
        return Row(where, {}, ["each line must be a JSON object like {\"image\": \"face.png\"}"])
    row = Row(where, values)
    if unknown := sorted(set(values) - set(columns)):
        row.problems.append(f"unknown key(s) {', '.join(map(repr, unknown))}; keys can be: " + ", ".join(columns))
    return row


def _check_room(rows: list[Row], limit: int | None) -> None:
    if limit is not None and len(rows) >= limit:
        raise TooManyRows(f"more than {limit} rows, a job each")
