"""Build (or extend) a FAISS retrieval index from a feature store.

The `srt-index` command, run from a checkout (`python jobs/build_index.py ...`, also as the entrypoint of
`ray job submit --working-dir . -- python jobs/build_index.py ...`). Its code: pipeline/commands/build_index.py.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout whose package is not installed

from pipeline.commands.build_index import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
