"""What --append adds to a plan: the dataset's inputs the plan does not hold yet (containers and
image files not listed before, lines added at the end of a file list), and what was listed before
and is gone since (reported, never removed from the store).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline.extraction.listing import FILES_PER_INPUT, LIST_EXTENSIONS, Input, dataset_inputs, list_ranges, list_tail
from pipeline.store.plan import PlanIndex, plan_dir


@dataclass
class Appended:
    """What --append found: new items planned after the existing rows, inputs gone since."""

    items: int = 0
    inputs: int = 0
    first_row: int = 0
    removed: list[str] = field(default_factory=list)  # inputs (containers, image files, lists) no longer found
    edited: list[str] = field(default_factory=list)  # file lists changed other than by lines added at the end

    def as_dict(self) -> dict[str, Any]:
        """For summary.json: counts, and the first names of what is gone or edited."""
        return {"items": self.items, "inputs": self.inputs, "first_row": self.first_row, "removed": len(self.removed),
                "removed_examples": self.removed[:10], "edited_lists": self.edited}  # fmt: skip

    def describe(self) -> str:
        said = [f"--append: {self.items} new items in {self.inputs} inputs, planned from row {self.first_row}" if self.items else "--append: nothing new in --dataset"]
        if self.removed:
            said.append(f"{len(self.removed)} inputs listed before are gone (their rows stay in the store): " + ", ".join(self.removed[:3]) + (" ..." if len(self.removed) > 3 else ""))
        if self.edited:
            said.append("file lists edited other than by adding lines at the end are not listed again: " + ", ".join(self.edited))
        return "; ".join(said)


def new_inputs(dataset: str, out: str, index: PlanIndex, storage_options: dict[str, Any]) -> tuple[list[Input], Appended]:
    """The dataset's inputs the plan does not hold yet: containers not listed before, image files
    not planned before, and lines added at the end of a file list. Whatever was listed before and
    is gone is reported, never removed from the store."""
    appended = Appended()
    fs, path = fsspec.core.url_to_fs(dataset, **storage_options)
    table = index.table
    if path.lower().endswith(LIST_EXTENSIONS):
        return _new_lines(fs, path, table, appended, storage_options), appended
    known = set(table.filter(pc.is_in(table.column("kind"), pa.array(["tar", "parquet"]))).column("input").to_pylist())
    planned_files = _planned_files(out, table, storage_options)
    units: list[Input] = []
    files: list[str] = []
    found: set[str] = set()
    for unit in dataset_inputs(dataset, storage_options):
        if unit.kind == "files":
            found.update(unit.files)
            files.extend(uri for uri in unit.files if uri not in planned_files)
        elif unit.uri in known:
            found.add(unit.uri)
        else:
            units.append(unit)
    units.extend(Input("files", dataset, tuple(files[i : i + FILES_PER_INPUT])) for i in range(0, len(files), FILES_PER_INPUT))
    appended.removed = sorted((known | planned_files) - found)
    return units, appended


def _planned_files(out: str, table: pa.Table, storage_options: dict[str, Any]) -> set[str]:
    """The image files the plan holds (batches of loose files are the only inputs named per item)."""
    fs, root = fsspec.core.url_to_fs(plan_dir(out), **storage_options)
    planned: set[str] = set()
    for path in table.filter(pc.equal(table.column("kind"), "files")).column("path").to_pylist():
        with fs.open(f"{root}/{path}", "rb") as handle:
            planned.update(pq.read_table(handle, columns=["uri"]).column(0).to_pylist())
    return planned


def _new_lines(fs: fsspec.AbstractFileSystem, path: str, table: pa.Table, appended: Appended, storage_options: dict[str, Any]) -> list[Input]:
    """A file list's lines after the last byte listed, when the bytes before it are unchanged."""
    rows = table.filter(pc.equal(table.column("kind"), "list")).to_pylist()
    last = max(rows, key=lambda row: row["stop"]) if rows else None
    if last is None:
        return []
    uri = last["input"]
    if not fs.exists(path):
        appended.removed.append(uri)
        return []
    size = fs.size(path)
    if size < last["stop"] or list_tail(uri, last["stop"], storage_options) != last["tail"]:
        appended.edited.append(uri)
        return []
    return list(list_ranges(uri, size, last["stop"]))
