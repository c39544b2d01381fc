"""Issue 18 probe: does an importance matrix from the run's training conversations lower the parity
loss of the 4-5 bit GGUF types on the demo run? The parity gate's data (16 held-out conversations)
and reference (the merged model); llama.cpp's own llama-imatrix and llama-quantize, built from the
llama-cpp-python sdist with the tools on (not yet part of set-up).

    python bench/imatrix_probe.py --home /tmp/demo-ws --tools BUILD/bin --work /tmp/imx Q4_K_M Q5_K_M

Prints one JSON line per (type, with/without imatrix): size, perplexity, Δppl vs the merged model,
KL and greedy agreement, as the gate computes them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def calibration_text(ws: Any, tokenizer: Any, dataset: Any, out: Path) -> Path:
    """The run's training conversations rendered with the model's own template, one after another."""
    from appliance import chat
    from appliance.stages.datasets import importer as datasets

    rows = datasets.load_rows(dataset, "train")
    text = "".join(chat.render(tokenizer, r["messages"]) for r in rows)
    out.write_text(text, encoding="utf-8")
    print(f"calibration: {len(rows)} train conversations, {len(tokenizer(text)['input_ids'])} tokens",
          flush=True)
    return out


def run(tool: Path, *args: str) -> None:
    env = dict(os.environ, LD_LIBRARY_PATH=str(tool.parent))
    done = subprocess.run([str(tool), *args], env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{tool.name} failed ({done.returncode}): {done.stderr[-1500:]}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True, help="a workspace after `appliance demo`")
    ap.add_argument("--tools", type=Path, required=True, help="llama-imatrix, llama-quantize, their libs")
    ap.add_argument("--work", type=Path, default=Path("/tmp/imx"))
    ap.add_argument("types", nargs="*", default=["Q4_K_M"])
    args = ap.parse_args()

    from appliance.hfmodel import load_tokenizer
    from appliance.stages.verify import parity
    from appliance.stages.verify.scoring import HFScorer, parity_data
    from appliance.workspace import Workspace
    from export import gguf
    from export.gguf import GgufLM

    ws = Workspace(args.home)
    merged = ws.get("export", "demo-qlora-merged")
    model, dataset = ws.get("model", "smollm2-135m-instruct"), ws.get("dataset", "dolly-sample")
    tokenizer = load_tokenizer(model.path)
    data, _ = parity_data(model, dataset, tokenizer)
    args.work.mkdir(parents=True, exist_ok=True)
    f16 = args.work / "m-F16.gguf"
    if not f16.exists():
        gguf.convert(merged.path, f16, outtype="f16")
    calib = calibration_text(ws, tokenizer, dataset, args.work / "calib.txt")
    imatrix = args.work / "imatrix.gguf"
    if not imatrix.exists():
        start = time.perf_counter()
        run(args.tools / "llama-imatrix", "-m", str(f16), "-f", str(calib), "-o", str(imatrix),
            "-c", "512", "-t", "2", "--no-ppl")
        print(f"imatrix: {time.perf_counter() - start:.1f} s", flush=True)
    ref = HFScorer(merged.path)
    ref_rows = parity.reference_rows(ref, data)
    ref_score = parity.score(ref, data, ref_rows)
    for qtype in args.types:
        for use in (False, True):
            out = args.work / f"m-{qtype}{'-imx' if use else ''}.gguf"
            run(args.tools / "llama-quantize", *(["--imatrix", str(imatrix)] if use else []),
                str(f16), str(out), qtype, "2")
            with GgufLM(out, n_ctx=1024, n_threads=2) as lm:
                s = parity.score(lm, data, ref_rows)
            print(json.dumps({"type": qtype, "imatrix": use, "MiB": round(out.stat().st_size / 2**20, 1),
                              "ppl": round(s.perplexity, 4),
                              "dppl_pct": round(100 * (s.perplexity / ref_score.perplexity - 1), 2),
                              "kl": round(s.kl / s.count, 4),
                              "agree_pct": round(100 * s.agree / s.count, 2)}), flush=True)
    print("reference (merged) ppl", round(ref_score.perplexity, 4))


if __name__ == "__main__":
    main()
