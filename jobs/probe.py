"""Linear probes for depth or semantic segmentation on feature stores, side by side (Ray Train).

The `srt-probe` command, run from a checkout (`python jobs/probe.py ...`, also as the entrypoint of
`ray job submit --working-dir . -- python jobs/probe.py ...`). Its code: pipeline/commands/probe.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout whose package is not installed

from pipeline.commands.probe import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
