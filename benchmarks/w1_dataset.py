"""Write W1 (see throughput.py) as a Parquet prompt dataset for the Ray pipeline: token-id prompts with
per-row max_tokens, so `jobs/offline_batch.py` runs the same work the engine benchmark does.

    python benchmarks/w1_dataset.py /tmp/w1.parquet [--num-prompts 256]
"""
import argparse
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.throughput import w1_requests  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("path")
    ap.add_argument("--num-prompts", type=int, default=256)
    args = ap.parse_args()
    prompts, params = w1_requests(args.num_prompts)
    table = pa.table({"prompt": pa.array(prompts, pa.list_(pa.int32())),
                      "max_tokens": pa.array([p.max_tokens for p in params], pa.int32())})
    pq.write_table(table, args.path)
    print(f"wrote {table.num_rows} prompts to {args.path}")


if __name__ == "__main__":
    main()
