#!/usr/bin/env python3
"""Tokenization throughput of the data pipeline by worker count, on this machine's CPU.

    python scripts/benchmark_tokenization.py --source FILE.jsonl --tokenizer ID_OR_PATH [--workers 1,2,4]
        [--repeat 20]

The source is repeated ``--repeat`` times into a temporary file so that each run lasts long
enough to time; every run prepares from scratch into a temporary folder.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

from training_harness.prepare_data import PrepareConfig, prepare, read_meta


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    parser.add_argument("--source", required=True, help="local .jsonl/.json/.parquet/.txt file to tokenize")
    parser.add_argument("--tokenizer", required=True, help="hub id, folder or tokenizer.json")
    parser.add_argument("--workers", default="1,2", help="comma-separated worker counts to time")
    parser.add_argument("--repeat", type=int, default=20, help="times the source is repeated, for a longer timing")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as work:
        corpus = Path(work) / "corpus.jsonl"
        corpus.write_text(Path(args.source).read_text() * args.repeat)
        print("| workers | documents | tokens | MB of text | seconds | tokens/s | MB/s |")
        print("| ---: | ---: | ---: | ---: | ---: | ---: | ---: |")
        for workers in (int(w) for w in args.workers.split(",")):
            output = Path(work) / f"out{workers}"
            started = time.perf_counter()
            prepare(PrepareConfig(source=str(corpus), tokenizer=args.tokenizer, output_dir=str(output),
                                  val_fraction=0.01, workers=workers, batch_documents=256))
            seconds = time.perf_counter() - started
            splits = read_meta(output)["splits"]
            tokens = sum(s["tokens"] for s in splits.values())
            documents = sum(s["documents"] for s in splits.values())
            megabytes = sum(s["utf8_bytes"] for s in splits.values()) / 1e6
            print(f"| {workers} | {documents:,} | {tokens:,} | {megabytes:.1f} | {seconds:.2f} | "
                  f"{tokens / seconds:,.0f} | {megabytes / seconds:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
