"""Q40 x Q80 kernel throughput vs memory read bandwidth on Llama-3.2-1B shapes.

    python bench/bench_kernels.py [--threads 1 2] [--batch 32] [--json]

Numbers are GB/s of weight bytes; "of bw" is matvec GB/s divided by the read bandwidth measured in
the same run at the same thread count. The CPU may be shared: run it when the machine is quiet.
"""
from __future__ import annotations

import argparse
import json
import logging

from dairllm.bench_kernels import bench_kernels, format_report


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--threads", type=int, nargs="+", default=None, help="thread counts (default: 1 and all)")
    p.add_argument("--batch", type=int, default=32, help="tokens per batched matmul")
    p.add_argument("--sweep-mib", type=int, default=256, help="weight bytes swept per timing (> last-level cache)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.add_argument("-v", "--verbose", action="store_true")
    a = p.parse_args()
    logging.basicConfig(level=logging.INFO if a.verbose else logging.WARNING)
    r = bench_kernels(threads=a.threads, batch=a.batch, sweep_bytes=a.sweep_mib << 20, repeats=a.repeats)
    print(json.dumps(r, indent=1) if a.json else format_report(r))


if __name__ == "__main__":
    main()
