"""Extract SRT features of an image dataset into a Zarr store with a Parquet manifest.

The `srt-extract` command, run from a checkout (`python jobs/extract.py ...`, also as the entrypoint of
`ray job submit --working-dir . -- python jobs/extract.py ...`). Its code: pipeline/commands/extract.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout whose package is not installed

from pipeline.commands.extract import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
