"""Evaluate retrieval (mAP, recall@k) of one or more stores and descriptors, side by side.

The `srt-eval-retrieval` command, run from a checkout (`python jobs/eval_retrieval.py ...`, also as the entrypoint of
`ray job submit --working-dir . -- python jobs/eval_retrieval.py ...`). Its code: pipeline/commands/eval_retrieval.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout whose package is not installed

from pipeline.commands.eval_retrieval import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
