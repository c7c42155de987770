"""Colour tables of colour-coded masks (each class a colour, as CamVid's and DeepGlobe's).

Two layouts are read:

* ``R G B CLASS_ID`` lines, commas or spaces between the numbers (``128,64,128,3``), or
  ``VALUE CLASS_ID`` lines: a value map, which renumbers the values of grey or
  palette-index masks (``0 255`` then ``1 0``, ``2 1``, ... for ADE20K's void 0);
* a table whose first row names its columns: the colour's ``r``, ``g``, ``b`` (or ``red``,
  ``green``, ``blue``), optionally the class's ``name`` and ``id``, as the
  ``class_dict.csv`` that CamVid's, DeepGlobe's and other data sets' downloads put beside
  their masks (``name,r,g,b``: the rows' order gives the class ids 0, 1, ...).

``#`` starts a comment in both; blank lines are skipped.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path

from ..errors import DataValidationError

# Names the data sets' downloads give their table, looked for in and beside the masks folder
COLOR_TABLE_FILES = ("class_dict.csv", "label_class_dict.csv", "class_dict_seg.csv")

# A table's column names, lower-cased -> the column's role
_COLUMNS = {
    **dict.fromkeys(("r", "red"), "r"),
    **dict.fromkeys(("g", "green"), "g"),
    **dict.fromkeys(("b", "blue"), "b"),
    **dict.fromkeys(("name", "class", "class_name", "classname", "label", "label_name",
                     "category"), "name"),
    **dict.fromkeys(("id", "class_id", "classid", "label_id", "index"), "id"),
}

Colour = tuple[int, int, int]


def find_color_table(masks_dir: str | os.PathLike) -> Path | None:
    """The colour table in the masks folder, else beside it (in its parent): the first of
    :data:`COLOR_TABLE_FILES` there; None if there is none."""
    masks_dir = Path(masks_dir).expanduser()
    for folder in (masks_dir, masks_dir.parent):
        for name in COLOR_TABLE_FILES:
            if (folder / name).is_file():
                return folder / name
    return None


def color_table_for(masks_dir: str | os.PathLike, mask: str | os.PathLike) -> Path | None:
    """The colour table of a folder of colour-coded masks: :func:`find_color_table`'s, when
    ``mask`` (one of the masks) is a colour image; else None (grey or palette masks hold
    class ids already, and a table beside them is not theirs to apply)."""
    table = find_color_table(masks_dir)
    return table if table is not None and _colour_image(mask) else None


def _colour_image(path: str | os.PathLike) -> bool:
    """Whether the picture at ``path`` is in colour (RGB or RGBA), from its header only."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as picture:
            return picture.mode in ("RGB", "RGBA")
    except (OSError, UnidentifiedImageError, ValueError):
        return False  # read (and reported) with the other masks later


def read_color_map(path: str | os.PathLike
                   ) -> tuple[dict[Colour, int] | dict[int, int], list[str] | None]:
    """The colour -> class id map of a colour table, and its class names when it has them.

    Parameters
    ----------
    path : str or PathLike
        A file of ``R G B CLASS_ID`` lines (or ``VALUE CLASS_ID`` lines), or a table with
        a header row naming the columns ``r``, ``g``, ``b`` and optionally ``name`` and
        ``id`` (see the module's description).

    Returns
    -------
    color_map : dict
        ``{(r, g, b): class_id}`` (``{value: class_id}`` from ``VALUE CLASS_ID`` lines), as
        :meth:`~automask.SemanticSegmentor.fit` takes it.
    class_names : list of str or None
        Names by class id, from a table with a name column whose ids are 0..n-1; None
        otherwise.

    Raises
    ------
    DataValidationError
        An unreadable file, a header without the colour columns, a value that is not an
        integer (colours 0-255, values 0-65535, ids >= 0), a colour or value listed twice,
        lines of both kinds, one id named twice
        differently, or no colour at all; the message names the file and the line.
    """
    try:
        with open(path, encoding="utf-8-sig", newline="") as handle:  # a BOM is no text
            lines = handle.read().splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise DataValidationError(f"cannot read the colour table {str(path)!r}: {exc}") from exc
    rows = [(number, text) for number, line in enumerate(lines, 1)
            if (text := line.split("#", 1)[0].strip())]
    if not rows:
        raise DataValidationError(f"the colour table {str(path)!r} lists no colour")
    first = _fields(rows[0][1])
    if all(_is_int(field) for field in first):
        return _numbered(path, rows), None
    return _table(path, first, rows[0][0], rows[1:])


def _fields(text: str) -> list[str]:
    """A line's fields: comma-separated (quotes as in CSV), else separated by spaces."""
    if "," in text:
        return [field.strip() for field in next(csv.reader([text]))]
    return text.split()


def _is_int(text: str) -> bool:
    try:
        int(text)
    except ValueError:
        return False
    return True


def _numbered(path, rows: list[tuple[int, str]]) -> dict[Colour, int] | dict[int, int]:
    """``R G B CLASS_ID`` lines, or ``VALUE CLASS_ID`` lines (as many fields as the first)."""
    values = len(_fields(rows[0][1])) == 2
    expected = "VALUE CLASS_ID (two integers, as the first line)" if values else \
        "R G B CLASS_ID (four integers)"
    out: dict = {}
    for number, text in rows:
        fields = _fields(text)
        if len(fields) != (2 if values else 4) or not all(_is_int(field) for field in fields):
            raise DataValidationError(
                f"colour table {str(path)!r} line {number}: expected {expected}, got {text!r}")
        *key, class_id = (int(field) for field in fields)
        _add(out, path, number, key[0] if values else tuple(key), class_id)
    return out


def _table(path, header: list[str], header_line: int, rows: list[tuple[int, str]]
           ) -> tuple[dict[Colour, int], list[str] | None]:
    """A table with a header row (``name,r,g,b``)."""
    roles: dict[str, int] = {}
    for index, column in enumerate(header):
        role = _COLUMNS.get(column.strip().lower())
        if role is not None and role not in roles:
            roles[role] = index
    missing = [role for role in ("r", "g", "b") if role not in roles]
    if missing:
        raise DataValidationError(
            f"colour table {str(path)!r} line {header_line}: the header {header} has no "
            f"column {', '.join(missing)}; a table names its columns r, g, b (red, green, "
            "blue) and optionally name and id, or lists R G B CLASS_ID lines without a header")
    out: dict[Colour, int] = {}
    names: dict[int, str] = {}
    for row, (number, text) in enumerate(rows):
        fields = _fields(text)
        if len(fields) < len(header):
            raise DataValidationError(
                f"colour table {str(path)!r} line {number}: {len(fields)} field(s) for the "
                f"header's {len(header)}: {text!r}")
        values = {}
        for role in ("r", "g", "b", "id"):
            if role in roles:
                field = fields[roles[role]]
                if not _is_int(field):
                    raise DataValidationError(
                        f"colour table {str(path)!r} line {number}: column "
                        f"{header[roles[role]]!r} is not an integer: {field!r}")
                values[role] = int(field)
        class_id = values.get("id", row)  # without an id column, the rows' order
        _add(out, path, number, (values["r"], values["g"], values["b"]), class_id)
        if "name" in roles:
            name = fields[roles["name"]]
            if names.setdefault(class_id, name) != name:
                raise DataValidationError(
                    f"colour table {str(path)!r} line {number}: class id {class_id} is named "
                    f"both {names[class_id]!r} and {name!r}")
    if not out:
        raise DataValidationError(f"the colour table {str(path)!r} lists no colour")
    names.pop(255, None)  # the void colour listed with id 255 (as advised) names no class
    ordered = [names.get(i) for i in range(len(names))]
    return out, (ordered if names and None not in ordered else None)


def _add(out: dict, path, number: int, colour: Colour | int, class_id: int) -> None:
    if isinstance(colour, int):  # a value map's mask value
        if not 0 <= colour <= 65535:
            raise DataValidationError(
                f"colour table {str(path)!r} line {number}: mask value {colour} is not in "
                "0-65535")
    elif any(not 0 <= value <= 255 for value in colour):
        raise DataValidationError(
            f"colour table {str(path)!r} line {number}: colour {colour} is not 8-bit "
            "(0-255 each)")
    if class_id < 0:
        raise DataValidationError(
            f"colour table {str(path)!r} line {number}: class id {class_id} is negative")
    if colour in out:
        raise DataValidationError(
            f"colour table {str(path)!r} line {number}: "
            f"{'value' if isinstance(colour, int) else 'colour'} {colour} is listed twice")
    out[colour] = class_id
