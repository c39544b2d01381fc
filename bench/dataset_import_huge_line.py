"""Dataset import with one huge line: time and peak memory.

A JSONL file holds a few ordinary conversations and one line of `--sizes` MB (an alpaca record whose
instruction is that long, no newline inside). Each size runs in its own child process (so its peak
RSS is its own) through the import's parsing path: `datasets.parse_file` with the `LengthCheck` of
the real SmolLM2 tokenizer and chat template (tests/fixtures/smollm2-tokenizer, context 8192) and
its `max_line_bytes`, exactly as `datasets.import_file` calls them (without writing the dataset).
Printed per size (JSON): seconds, the child's peak RSS, the peak RSS of the same child before
parsing (imports and tokenizer), lines kept, and the huge line's rejection reason.

Before the cheap bounds, a 50 MB line was rendered and tokenized whole before being rejected as
too long: 198 s and 4.5 GB RSS on the 2-core box.

Usage: .venv/bin/python bench/dataset_import_huge_line.py [--sizes 50 500] [--tmp DIR]
Targets: the huge line costs well under a second and its size does not show in the peak RSS.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = r"""
import json, resource, sys, time
from pathlib import Path
from transformers import AutoTokenizer
from appliance.stages.datasets import importer as datasets

path, tokenizer_dir = Path(sys.argv[1]), sys.argv[2]
check = datasets.LengthCheck(AutoTokenizer.from_pretrained(tokenizer_dir), 8192)
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
result = datasets.parse_file(path, "auto", check, max_line_bytes=check.max_line_bytes)
seconds = time.perf_counter() - start
print(json.dumps({"seconds": round(seconds, 3),
                  "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
                  "rss_before_parsing_mb": round(before / 1024, 1), "kept": len(result.train),
                  "rejected": [(r["line"], r["reason"]) for r in result.rejected]}))
"""


def write_file(path: Path, megabytes: int) -> None:
    small = [{"instruction": f"Name a colour ({i}).", "response": "Blue."} for i in range(3)]
    with open(path, "wb") as fh:
        fh.write(json.dumps(small[0]).encode() + b"\n")
        fh.write(b'{"instruction": "')
        block = b"x" * (1 << 20)
        for _ in range(megabytes):
            fh.write(block)
        fh.write(b'", "response": "R"}\n')
        for row in small[1:]:
            fh.write(json.dumps(row).encode() + b"\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[50, 500], help="huge line sizes, MB")
    parser.add_argument("--tmp", type=Path, default=None, help="where to write the test files")
    args = parser.parse_args()
    tokenizer_dir = REPO / "tests" / "fixtures" / "smollm2-tokenizer"
    with tempfile.TemporaryDirectory(dir=args.tmp) as tmp:
        for megabytes in args.sizes:
            path = Path(tmp) / f"huge-{megabytes}mb.jsonl"
            write_file(path, megabytes)
            out = subprocess.run([sys.executable, "-c", CHILD, str(path), str(tokenizer_dir)],
                                 capture_output=True, text=True, cwd=REPO, check=True)
            print(json.dumps({"line_mb": megabytes, **json.loads(out.stdout.strip().splitlines()[-1])}))
            path.unlink()


if __name__ == "__main__":
    main()
