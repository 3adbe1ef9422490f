"""Serve retrieval indexes over HTTP with a page to search them (the `srt-serve` command).

The `srt-serve` command, run from a checkout (`python jobs/serve.py ...`). Its code:
pipeline/commands/serve.py and pipeline/commands/service/.
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # a checkout whose package is not installed

from pipeline.commands.serve import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
