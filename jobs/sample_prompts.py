"""Write the built-in sample prompts to a file: ``python jobs/sample_prompts.py prompts.parquet [--rows 64]``.

They are 64 short questions as chat messages (a ``messages`` column). The format follows the extension:
.parquet or .jsonl (CSV cannot hold chat messages). ``offline_batch.py`` uses the same prompts when --input is
omitted, so this is only needed to look at or edit them.
"""
import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pyarrow.parquet as pq  # noqa: E402

from pipeline.sample import sample_prompts  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("path", help="output file: .parquet or .jsonl")
    p.add_argument("--rows", type=int, default=64, help="number of prompts (at most 64)")
    args = p.parse_args(argv)
    table = sample_prompts(args.rows)
    if args.path.endswith(".parquet"):
        pq.write_table(table, args.path)
    elif args.path.endswith(".jsonl"):
        import json
        with open(args.path, "w") as fh:
            for row in table.to_pylist():
                fh.write(json.dumps({k: v for k, v in row.items() if v is not None}) + "\n")
    else:
        p.error("the path must end in .parquet or .jsonl (CSV cannot hold chat messages)")
    print(f"wrote {table.num_rows} prompts to {args.path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
