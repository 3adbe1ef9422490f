"""Unsupervised salient-region segmentation (TokenCut) of a feature store's images, with maxF and IoU.

The `srt-saliency` command, run from a checkout (`python jobs/saliency.py ...`, also as the entrypoint of
`ray job submit --working-dir . -- python jobs/saliency.py ...`). Its code: pipeline/commands/saliency.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout whose package is not installed

from pipeline.commands.saliency import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
