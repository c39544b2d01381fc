"""Evaluation throughput on this box: items per minute of `appliance eval` through one target's own
runtime (issue 17's goal: 100 items of at most 128 new tokens in under 3 minutes on the 2-core CPU,
SmolLM2 through llama.cpp).

It evaluates TARGET (an export of a workspace that holds one: `appliance demo` makes
demo-qlora-gguf-q8_0) on the first N conversations of the Dolly sample the product ships, as a
job, end to end (the job's start, loading, generation, perplexity of the references, the report),
and prints the wall time, items per minute, generated tokens and the job's own split between
loading and answering. Each repeat is a new eval (a new name), so nothing is reused.

    .venv/bin/python bench/eval_speed.py --home /tmp/demo-ws --target demo-qlora-gguf-q8_0 \\
        --items 100 --max-new-tokens 128 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def one(home: Path, target: str, items: int, tokens: int, name: str) -> dict[str, float]:
    from appliance.demo import sample_dataset

    cmd = [sys.executable, "-m", "appliance", "--home", str(home), "eval", target,
           "--data", str(sample_dataset()), "--limit", str(items), "--max-new-tokens", str(tokens),
           "--name", name, "--json"]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        raise SystemExit(f"eval failed ({done.returncode}): {done.stderr[-2000:]}")
    doc = json.loads((home / "evals" / name / "eval.json").read_text(encoding="utf-8"))
    row = doc["targets"][0]
    generated = sum(i["tokens"] for i in row["items"])
    return {"wall_s": round(wall, 1), "items_per_min": round(60 * items / wall, 1),
            "generated_tokens": generated, "generated_per_s": round(generated / wall, 1),
            "stopped": row["stopped"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True, help="a workspace holding the target")
    ap.add_argument("--target", required=True)
    ap.add_argument("--items", type=int, default=100)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    sys.path.insert(0, str(ROOT))
    print(json.dumps({"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                      "python": platform.python_version(), "load": os.getloadavg()[0]}))
    runs = []
    for n in range(args.repeats):
        runs.append(one(args.home, args.target, args.items, args.max_new_tokens,
                        f"bench-speed-{int(time.time())}-{n}"))
        print(json.dumps(runs[-1]), flush=True)
    walls = [r["wall_s"] for r in runs]
    median = statistics.median(walls)
    print(f"{args.items} items, at most {args.max_new_tokens} new tokens, {args.target}: median "
          f"{median:.1f} s ({60 * args.items / median:.1f} items/min) over {len(runs)} runs "
          f"(spread {min(walls):.1f}-{max(walls):.1f} s); goal: 100 items in 180 s")


if __name__ == "__main__":
    main()
