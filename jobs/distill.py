"""Self-distillation: train a ViT whose single pass approaches the SRT features of a store (Ray Train).

The `srt-distill` command, run from a checkout (`python jobs/distill.py ...`, also as the entrypoint of
`ray job submit --working-dir . -- python jobs/distill.py ...`). Its code: pipeline/commands/distill.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout whose package is not installed

from pipeline.commands.distill import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
