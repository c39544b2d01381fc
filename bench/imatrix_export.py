"""Issue 18 through the product path: a table of GGUF exports made with and without an importance
matrix (`appliance export gguf RUN --quant ... --imatrix off|auto`), from their parity.json,
manifest and the export job's events (seconds per stage).

    python bench/imatrix_export.py --plain DIR_OF_PLAIN_EXPORTS --imatrix WS/exports \\
        --jobs WS/jobs/<plain job> WS/jobs/<imatrix job> --types q4_k_m q5_k_m

Prints a markdown table: size, Δppl vs the merged model, KL, greedy agreement, verdict, and the
quantize and gate seconds of each; then the imatrix stage's seconds and what the manifest recorded.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any


def stage_seconds(job_dir: Path) -> dict[tuple[str, str], float]:
    """(artifact, stage) -> seconds, from one stage's first event to the next stage's."""
    events = [json.loads(line) for line in (job_dir / "events.jsonl").read_text().splitlines()]
    staged = [e for e in events if e.get("type") == "progress" and e.get("stage")]
    out: dict[tuple[str, str], float] = {}
    for here, after in itertools.pairwise(staged):
        key = (here["artifact"], here["stage"])
        out[key] = out.get(key, 0.0) + after["ts"] - here["ts"]
    return out


def row(folder: Path, seconds: dict[tuple[str, str], float]) -> dict[str, Any]:
    parity = json.loads((folder / "parity.json").read_text())["artifacts"][0]
    data = json.loads((folder / "manifest.json").read_text())
    name = folder.name
    gguf = next(p for p in folder.glob("*.gguf") if p.name != "imatrix.gguf")
    return {"mib": gguf.stat().st_size / 2**20, "dppl": parity["ppl_increase"], "kl": parity["kl"],
            "agree": parity["agreement"], "passed": parity["passed"],
            "quantize_s": seconds.get((name, "quantize"), 0.0),
            "gate_s": sum(v for (a, s), v in seconds.items()
                          if a == name and s in ("check", "load-runtime", "score", "record")),
            "imatrix": (data.get("info") or {}).get("imatrix") or {}}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--plain", type=Path, required=True)
    ap.add_argument("--imatrix", type=Path, required=True)
    ap.add_argument("--jobs", type=Path, nargs=2, required=True,
                    help="the plain job's and the imatrix job's folders")
    ap.add_argument("--run", default="demo-qlora")
    ap.add_argument("--types", nargs="+", default=["q4_k_m", "q5_k_m", "q4_k_s", "iq4_xs"])
    args = ap.parse_args()
    plain_s, imx_s = stage_seconds(args.jobs[0]), stage_seconds(args.jobs[1])
    print("| type | MiB plain / imatrix | Δppl plain | Δppl imatrix | KL plain | KL imatrix | "
          "agreement plain | agreement imatrix | verdict plain / imatrix | quantize s plain / imatrix |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    record: dict[str, Any] = {}
    for qtype in args.types:
        name = f"{args.run}-gguf-{qtype}"
        p, m = row(args.plain / name, plain_s), row(args.imatrix / name, imx_s)
        record = m["imatrix"] or record
        verdict = " / ".join("pass" if r["passed"] else "FAIL" for r in (p, m))
        print(f"| {qtype.upper()} | {p['mib']:.1f} / {m['mib']:.1f} | {p['dppl']:+.2%} | {m['dppl']:+.2%} | "
              f"{p['kl']:.4f} | {m['kl']:.4f} | {p['agree']:.2%} | {m['agree']:.2%} | {verdict} | "
              f"{p['quantize_s']:.1f} / {m['quantize_s']:.1f} |")
    imx_stage = sum(v for (_, s), v in imx_s.items() if s == "imatrix")
    print(f"\nimatrix stage: {imx_stage:.0f} s; manifest record of the last type:\n")
    print("```json\n" + json.dumps(record, indent=1) + "\n```")


if __name__ == "__main__":
    main()
