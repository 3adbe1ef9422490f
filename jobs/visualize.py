"""Pictures of what SRT does: original | plain ViT features | SRT features, per image, as PNG.

The `srt-visualize` command, run from a checkout (`python jobs/visualize.py ...`, also as the entrypoint of
`ray job submit --working-dir . -- python jobs/visualize.py ...`). Its code: pipeline/commands/visualize.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout whose package is not installed

from pipeline.commands.visualize import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
