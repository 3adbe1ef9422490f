"""The versioned schema files under schemas/ describe exactly what the code writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from pipeline.store.schemas import PUBLISHED, describe

SCHEMAS = Path(__file__).resolve().parent.parent / "schemas"


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_each_schema_version_is_published_as_written(name):
    described = describe(PUBLISHED[name])
    path = SCHEMAS / f"{name}.v{described['schema_version']}.json"
    assert path.exists(), f"{path.name} is missing: a schema changed without a new version, or its file was not written"
    assert json.loads(path.read_text()) == described, f"{path.name} differs from the code: bump the schema's version and write a new file"

