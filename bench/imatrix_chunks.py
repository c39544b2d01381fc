"""How much calibration does the demo run's importance matrix need, and can it be computed on the
Q8_0 GGUF instead of the F16 one? (issue 14: `make demo` under 5 minutes; the imatrix was the
demo's longest stage: 160 s for 147 windows of 512 tokens over F16 on the 2-core box.)

For each (base GGUF, windows): the product's own `export.imatrix.compute` over the run's first
training conversations (`importance.calibration`, whole conversations up to windows x 512 tokens),
then Q4_K_M and Q5_K_M quantized with it and scored as the parity gate scores them (16 held-out
conversations against the merged model). Prints one JSON line per row.

    PYTHONPATH=. python bench/imatrix_chunks.py --home /tmp/demo-prof/ws --work /tmp/imx-chunks \
        --rows F16:147 F16:64 F16:32 Q8_0:147 Q8_0:64 Q8_0:32
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
RUN = "demo-qlora"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--home", type=Path, required=True, help="a workspace after `appliance demo`")
    ap.add_argument("--work", type=Path, default=Path("/tmp/imx-chunks"))
    ap.add_argument("--rows", nargs="+", default=["F16:147", "F16:32", "Q8_0:32"])
    ap.add_argument("--types", nargs="+", default=["Q4_K_M", "Q5_K_M"])
    args = ap.parse_args()

    from appliance.hfmodel import load_tokenizer
    from appliance.stages.export.importance import calibration
    from appliance.stages.verify import parity
    from appliance.stages.verify.scoring import HFScorer, parity_data
    from appliance.workspace import Workspace
    from export import gguf, imatrix
    from export.gguf import GgufLM

    ws = Workspace(args.home)
    merged = ws.get("export", f"{RUN}-merged")
    model, dataset = ws.get("model", "smollm2-135m-instruct"), ws.get("dataset", "dolly-sample")
    tokenizer = load_tokenizer(merged.path)
    data, _ = parity_data(model, dataset, tokenizer)
    args.work.mkdir(parents=True, exist_ok=True)
    bases = {"F16": args.work / "m-F16.gguf", "Q8_0": args.work / "m-Q8_0.gguf"}
    if not bases["F16"].exists():
        gguf.convert(merged.path, bases["F16"], outtype="f16")
    if not bases["Q8_0"].exists():
        gguf.quantize(bases["F16"], bases["Q8_0"], "Q8_0")
    ref = HFScorer(merged.path)
    ref_rows = parity.reference_rows(ref, data)
    ref_ppl = parity.score(ref, data, ref_rows).perplexity
    for row in args.rows:
        base, windows = row.split(":")
        calib = calibration(ws, RUN, tokenizer, max_tokens=int(windows) * imatrix.CHUNK)
        text = args.work / f"calib-{windows}.txt"
        text.write_text(calib.text, encoding="utf-8")
        out = args.work / f"imatrix-{base}-{windows}.gguf"
        start = time.perf_counter()
        imatrix.compute(bases[base], text, out, threads=2)
        seconds = time.perf_counter() - start
        for qtype in args.types:
            name, ftype = gguf.resolve_quant_type(qtype)
            q = args.work / f"m-{qtype}-{base}-{windows}.gguf"
            imatrix.quantize(bases["F16"], q, ftype, name, out, nthread=2)
            with GgufLM(q, n_ctx=1024, n_threads=2) as lm:
                s = parity.score(lm, data, ref_rows)
            print(json.dumps({"base": base, "windows": int(windows), "tokens": calib.tokens,
                              "conversations": len(calib.hashes), "imatrix_s": round(seconds, 1),
                              "type": qtype, "dppl_pct": round(100 * (s.perplexity / ref_ppl - 1), 2),
                              "kl": round(s.kl / s.count, 4),
                              "agree_pct": round(100 * s.agree / s.count, 2)}),
                  flush=True)


if __name__ == "__main__":
    main()
