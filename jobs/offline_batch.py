"""Batch LLM inference on Ray. ``python jobs/offline_batch.py --help`` lists the flags; docs/pipeline.md explains.

Runs from the repo root as ``python jobs/offline_batch.py ...`` or on a cluster as
``ray job submit --working-dir . -- python jobs/offline_batch.py --output /shared/path ...``.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.cli import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
