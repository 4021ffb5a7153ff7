"""Write a benchmark workload (``benchmarks/workloads.py``) as a Parquet prompt dataset for the batch job: token-id
prompts with per-row ``max_tokens``, so `jobs/offline_batch.py` (with ``--temperature 0.6``) runs W5's work. The job
always stops at EOS, so only workloads without ``ignore_eos`` (W5) are the same work there.

    python benchmarks/dataset.py W5 /tmp/w5.parquet
"""
import argparse
import os
import sys

import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.workloads import WORKLOADS, Request  # noqa: E402


def write_dataset(requests: list[Request], path: str) -> None:
    table = pa.table({"prompt": pa.array([p for p, _ in requests], pa.list_(pa.int32())),
                      "max_tokens": pa.array([kw["max_tokens"] for _, kw in requests], pa.int32())})
    pq.write_table(table, path)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("workload", choices=[w for w in WORKLOADS if not WORKLOADS[w]()[0][1]["ignore_eos"]])
    ap.add_argument("path")
    args = ap.parse_args()
    requests = WORKLOADS[args.workload]()
    write_dataset(requests, args.path)
    print(f"wrote {len(requests)} prompts to {args.path}")


if __name__ == "__main__":
    main()
