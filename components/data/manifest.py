"""The manifest row: one image of a data snapshot, as ingest writes it and read_manifest reads it back.

A leaf module (the row's type and `rows_of_split`), so every sub-package that passes manifest rows around can
name the type without importing ingest. Every value is a string, as in the CSV file. No `from __future__ import
annotations` here: with string annotations Python 3.11 does not see NotRequired and would count every key as
required.
"""

from typing import NotRequired, TypedDict


class ManifestRow(TypedDict):
    """One row of manifest.csv / manifest.clean.csv, column -> string value.

    path, label and split are what every reader needs. sha256, width, height and mode are always written by ingest
    ("" / "0" for a file that could not be read) but rows built elsewhere (a test, a plan's mirror sample) may lack
    them. A manifest may also carry extra label columns named by the data source (a CSV's extra columns, the
    multi-task demo's parity and ge5: `DatasetSnapshot.extra_label_columns`); their names are the user's, so they
    cannot be declared here and are read by name (`row[column]`).
    """

    path: str
    sha256: NotRequired[str]
    label: str  # a class name; for data.task=multilabel the row's labels joined by ";"
    split: str  # train, val or test
    width: NotRequired[str]
    height: NotRequired[str]
    mode: NotRequired[str]  # PIL mode of the file ("RGB", "L", ...); "" when it could not be read


# The columns ingest writes, in file order (extra label columns follow them).
MANIFEST_COLUMNS = list(ManifestRow.__annotations__)


def rows_of_split(rows: list[ManifestRow], split: str) -> list[ManifestRow]:
    """The manifest rows of one split ("train", "val", "test"; "all" keeps every row)."""
    return list(rows) if split == "all" else [row for row in rows if row["split"] == split]
