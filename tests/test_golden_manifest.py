"""tests/golden/ is complete and unchanged. Oracle: golden/manifest.json (size and sha256 of every
file, recorded with the data; the data files' entries equal the original recording's)."""
from __future__ import annotations

import json

from helpers.golden import data_files, describe


def test_every_file_matches_the_manifest(golden_dir):
    listed = json.loads((golden_dir / "manifest.json").read_text())["files"]
    assert [f["path"] for f in listed] == data_files(), "files added to or missing from tests/golden"
    for entry in listed:
        assert describe(entry["path"]) == entry, entry["path"]
