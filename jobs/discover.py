"""Single-object discovery (TokenCut, LOST) on a feature store, with CorLoc.

The `srt-discover` command, run from a checkout (`python jobs/discover.py ...`, also as the entrypoint of
`ray job submit --working-dir . -- python jobs/discover.py ...`). Its code: pipeline/commands/discover.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout whose package is not installed

from pipeline.commands.discover import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
