"""Class labels from where an image lies (``data.labels``): the first folder under a ``folder:`` or
``s3://`` source, as torchvision's ``ImageFolder`` takes it, or a label file for a flat folder
(ImageNet's validation images); and the class list the labels index, kept in ``classes.json``.

The class list rule (docs/design.md, Labels):
- a first run numbers the classes it finds in sorted order, so a class's index is the one
  ``ImageFolder`` gives it on the same tree;
- ``classes.json`` persists with the raw output, and a later run never renumbers it: a class
  already listed keeps its index, a new one is appended after the old ones (the new ones among
  themselves sorted), and the stage says so; a class with no image left keeps its index;
- to number from scratch (a deliberate renumbering), remove ``data/raw`` and run again.
"""

from __future__ import annotations

import csv
import os
from dataclasses import dataclass
from pathlib import Path

from ..samples import CLASSES_FILE

HEADER_FIRST_CELLS = {"imageid", "image", "image_id", "file", "filename", "file_name", "path", "name"}


@dataclass
class ClassList:
    names: list[str]  # index -> class name
    added: list[str]  # names this run appended to an earlier run's list
    renumbered: bool = False  # an added name sorts before an old one: indices left ImageFolder's order

    def index(self) -> dict[str, int]:
        return {name: i for i, name in enumerate(self.names)}

    def note(self) -> str | None:
        """What the stage prints when the list grew, else None."""
        if not self.added:
            return None
        shown = ", ".join(self.added[:5]) + (f" and {len(self.added) - 5} more" if len(self.added) > 5 else "")
        note = (f"{len(self.added)} new class(es) appended to {CLASSES_FILE} as {len(self.names) - len(self.added)}.."
                f"{len(self.names) - 1}: {shown}; the old classes keep their indices")
        if self.renumbered:
            note += (" (a new name sorts before an old one, so the indices now differ from ImageFolder's sorted "
                     "order: read the names from classes.json; remove data/raw to number from scratch)")
        return note


def extend_classes(previous: list[str], found) -> ClassList:
    """The class list: ``previous`` unchanged, then the names of ``found`` it lacks, sorted."""
    known = set(previous)
    added = sorted(set(found) - known)
    renumbered = bool(previous and added and added[0] < max(previous))
    return ClassList(list(previous) + added, added if previous else [], renumbered)


class LabelRule:
    """How a path under the source gets its class name: ``folder`` (its first folder) or ``file``
    (the label file's class for its file name)."""

    def __init__(self, mode: str, label_file: str = ""):
        self.mode = mode
        self.by_stem = read_label_file(Path(label_file)) if mode == "file" else {}

    def class_name(self, rel: str) -> tuple[str | None, str | None]:
        """(class name, None) or (None, the rejection "reason: detail")."""
        if self.mode == "folder":
            top, sep, _ = rel.partition("/")
            if not sep:
                return None, (f"no_class_folder: {rel} lies directly under the source; data.labels: folder takes "
                              "the class from the first folder (class/image.jpg)")
            return top, None
        stem = _stem(rel)
        name = self.by_stem.get(stem)
        if name is None:
            return None, f"no_label: {stem} is not in data.label_file"
        return name, None


def read_label_file(path: Path) -> dict[str, str]:
    """file stem -> class name, from ImageNet's LOC_val_solution.csv (``ImageId,PredictionString``:
    the class is the first word of the prediction) or any list of ``file,class`` (comma, tab or
    space separated; a header line is skipped)."""
    if not path.is_file():
        raise FileNotFoundError(f"data.label_file: {str(path)!r} does not exist")
    text = path.read_text(errors="replace")
    lines = [line for line in text.splitlines() if line.strip()]
    if lines and all(line.strip().isdigit() for line in lines[:100]):
        raise ValueError(f"data.label_file: {path}: one number per line looks like the devkit's "
                         "ILSVRC2012_validation_ground_truth.txt, whose ids need the devkit's meta.mat to become "
                         "classes; give LOC_val_solution.csv or a 'file,class' list")
    dialect = "excel-tab" if lines and "\t" in lines[0] else "excel"
    out: dict[str, str] = {}
    for n, row in enumerate(csv.reader(lines, dialect=dialect)):
        if len(row) == 1:  # space separated
            row = row[0].split(None, 1)
        if n == 0 and row and row[0].strip().lower() in HEADER_FIRST_CELLS:
            continue
        words = row[1].split() if len(row) >= 2 else []
        if not words:
            raise ValueError(f"data.label_file: {path}, line {n + 1}: expected 'file,class', got {','.join(row)!r}")
        stem = _stem(row[0].strip())
        if out.get(stem, words[0]) != words[0]:
            raise ValueError(f"data.label_file: {path}, line {n + 1}: {stem} is given two classes, "
                             f"{out[stem]} and {words[0]}")
        out[stem] = words[0]
    if not out:
        raise ValueError(f"data.label_file: {path}: no 'file,class' lines")
    return out


def _stem(rel: str) -> str:
    """'val/ILSVRC2012_val_00000001.JPEG' -> 'ILSVRC2012_val_00000001'."""
    return os.path.splitext(rel.replace("\\", "/").rsplit("/", 1)[-1])[0]
