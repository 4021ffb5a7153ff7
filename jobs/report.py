"""``python jobs/report.py <output>``: render a finished job's report.png and report.html (see docs/report.md)."""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from pipeline.report import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
