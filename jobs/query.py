"""Query a retrieval index by image_id of its store, or with new image files.

The `srt-query` command, run from a checkout (`python jobs/query.py ...`, also as the entrypoint of
`ray job submit --working-dir . -- python jobs/query.py ...`). Its code: pipeline/commands/query.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout whose package is not installed

from pipeline.commands.query import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
