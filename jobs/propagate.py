"""Semi-supervised video object segmentation (DAVIS-2017) by label propagation from a feature store.

The `srt-propagate` command, run from a checkout (`python jobs/propagate.py ...`, also as the entrypoint of
`ray job submit --working-dir . -- python jobs/propagate.py ...`). Its code: pipeline/commands/propagate.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout whose package is not installed

from pipeline.commands.propagate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
