"""Distil teacher reasoning traces into an SFT dataset: the same command as ``cellduality sft-data``.

    python sft_data/generate.py --data prepared/pbmc68k --out sft_data/offline
    python sft_data/generate.py --data prepared/pbmc68k --out sft_data/run1 \\
        --teacher-base-url https://api.openai.com/v1 --teacher-model gpt-4o --api-key-env OPENAI_API_KEY

See sft_data/README.md. The code lives in ``cellduality.teacher`` (engine: ``pipeline``, filters:
``filters``, teacher prompt templates: ``cellduality/teacher/templates/``) so that the installed
package, the ``cellduality`` command and the SFT entry point all run the same thing.
"""

from __future__ import annotations

import sys
from pathlib import Path

if __name__ == "__main__":
    try:
        from cellduality.teacher.command import main
    except ModuleNotFoundError:  # run from a checkout without `pip install -e .`
        sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
        from cellduality.teacher.command import main

    sys.exit(main(prog="sft_data/generate.py"))
