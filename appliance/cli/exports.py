"""`appliance merge`, `appliance export gguf|onnx`, `appliance verify` and
`appliance exports list|show|rm`: from a run to deployable artifacts, parity-checked."""

from __future__ import annotations

import argparse
import json
from typing import Any

from appliance.cli.common import (
    SUMMARY_KEYS,
    add_list,
    add_rm,
    add_show,
    artifact_json,
    complete,
    json_flag,
    list_artifacts,
    names,
    run_job,
    show_artifact,
)
from appliance.errors import ExitCode, ValidationError
from appliance.textout import open_workspace, say


def _thresholds(items: list[str] | None) -> dict[str, float]:
    from appliance.stages.train.config import parse_override
    from appliance.stages.verify.request import THRESHOLD_KEYS

    out = {}
    for item in items or []:
        key, value = parse_override(item, "--threshold")
        if key not in THRESHOLD_KEYS or not isinstance(value, int | float):
            raise ValidationError(f"--threshold {item!r}: expected one of "
                                  f"{', '.join(THRESHOLD_KEYS)}=NUMBER")
        out[key] = float(value)
    return out


def _types(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def _parity(record: Any) -> dict[str, Any] | None:
    path = record.path / "parity.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None


def parity_lines(report: dict[str, Any]) -> list[str]:
    """The parity table, then one verdict line per gated artifact with the thresholds it was judged
    by (what `verify` and `exports show` print)."""
    from appliance.stages.verify import parity

    lines = [parity.table(report)]
    for row in report["artifacts"]:
        if row["passed"] is None:  # reported, not gated (the adapter beside a merged model)
            continue
        t = row["threshold"]
        limits = (f"perplexity increase at most {t['ppl_increase']:+.2%}, KL at most {t['kl']:g}, "
                  f"agreement at least {t['agreement']:.1%}")
        verdict = "PASSED" if row["passed"] else "FAILED (" + "; ".join(row["reasons"]) + ")"
        lines.append(f"verdict for {row['name']}: {verdict}; thresholds for {row['kind']}: {limits}")
    return lines


def _merge_report(ws: Any, job: Any) -> tuple[dict[str, Any], int]:
    return {"export": artifact_json(ws.get("export", job.result["export"]))}, ExitCode.OK


def _export_report(ws: Any, job: Any) -> tuple[dict[str, Any], int]:
    records = [ws.get("export", name) for name in job.result.get("exports", {})]
    failed = [r.name for r in records if r.status == "failed"]
    if failed:
        say(f"parity gate FAILED for: {', '.join(failed)} (marked failed in the registry)")
    doc = {"exports": [{**artifact_json(r), "parity": _parity(r)} for r in records],
           "passed": not failed}
    return doc, ExitCode.PARITY_FAILED if failed else ExitCode.OK


def _verify_report(ws: Any, job: Any) -> tuple[dict[str, Any], int]:
    record = ws.get("export", job.params["export"])
    report = _parity(record)
    for line in parity_lines(report) if report else []:
        say(line)
    passed = job.result.get("passed") is not False
    doc = {"export": artifact_json(record), "passed": passed, "parity": report}
    return doc, ExitCode.OK if passed else ExitCode.PARITY_FAILED


def cmd_merge(args: argparse.Namespace) -> int:
    from appliance.stages.merge.request import MergeRequest

    request = MergeRequest(run=args.run, dtype=args.dtype, base=args.base)
    return run_job(args, "merge", request.to_params(), "merge", _merge_report)


def _imatrix(value: str) -> str:
    """auto and off as they are; a file as an absolute path (the job runs elsewhere)."""
    from pathlib import Path

    from appliance.stages.export.request import IMATRIX_CHOICES

    return value if value in IMATRIX_CHOICES or not value else str(Path(value).expanduser().resolve())


def _require_run(args: argparse.Namespace) -> None:
    """Refused before a job is queued (nothing in `jobs list`): a run that is not there (exit 4),
    and one whose dataset has no eval split, which the gate would find only after the merge."""
    from appliance import manifest
    from appliance.errors import NotFoundError

    ws = open_workspace(args)
    run = ws.get("run", args.run)
    parents: list[dict[str, Any]] = manifest.read(run.path)["parents"]
    parent = next((p for p in parents if p.get("kind") == "dataset"), {})
    try:
        dataset = ws.get("dataset", str(parent.get("name")))
    except NotFoundError:  # the job names a missing parent, with its manifest checks
        return
    if dataset.summary.get("eval") == 0:
        raise ValidationError(f"run {args.run!r} was trained on dataset {dataset.name!r}, which has no "
                              "held-out (eval) conversations: the parity gate has nothing to score "
                              "its exports on", hint="import the dataset again with an eval split "
                              "(--eval-fraction) and train on it")


def cmd_export(args: argparse.Namespace) -> int:
    from appliance.stages.export.request import DEFAULT_CALIBRATE, DEFAULT_IMATRIX, ExportRequest

    _require_run(args)

    types = _types(args.quant if args.format == "gguf" else args.precision)
    request = ExportRequest(args.run, args.format, tuple(types), _thresholds(args.threshold),
                            imatrix=_imatrix(getattr(args, "imatrix", DEFAULT_IMATRIX)),
                            calibrate=getattr(args, "calibrate", DEFAULT_CALIBRATE))
    return run_job(args, "export", request.to_params(), f"{args.format} export", _export_report)


def cmd_export_plan(args: argparse.Namespace) -> int:
    """The candidate exports of a run in one job (GGUF types, then ONNX precisions: it survives
    the terminal closing), then the frontier to pick from."""
    from appliance.stages.export.request import PLAN, ExportRequest

    _require_run(args)
    request = ExportRequest(args.run, PLAN, (*_types(args.gguf), *_types(args.onnx)),
                            imatrix=_imatrix(args.imatrix), calibrate=args.calibrate)
    return run_job(args, "export", request.to_params(), "export plan", _plan_report)


def _plan_report(ws: Any, job: Any) -> tuple[dict[str, Any], int]:
    """The frontier of the plan's run (a candidate that failed its gate is listed, not marked)."""
    from appliance.stages.verify import frontier

    run = job.params["run"]
    rows = frontier.frontier(ws, run)
    _say_frontier(run, rows)
    return {"run": run, "exports": frontier.rows_json(rows)}, ExitCode.OK


def _say_frontier(run: str, rows: list[Any]) -> None:
    from appliance.stages.verify import frontier

    say(f"exports of {run}: size on disk, the parity gate's numbers on its held-out chats, greedy "
        "decode on this box; * = no other export is smaller, closer and faster at once")
    say(frontier.table(rows))


def cmd_verify(args: argparse.Namespace) -> int:
    from appliance.stages.verify.request import VerifyRequest

    request = VerifyRequest(export=args.export, overrides=_thresholds(args.threshold))
    open_workspace(args).get("export", args.export)  # one that is not there: refused, no job queued
    return run_job(args, "verify", request.to_params(), "parity", _verify_report)


def cmd_exports_list(args: argparse.Namespace) -> int:
    keys = ("status", *SUMMARY_KEYS["export"])
    return list_artifacts(args, "export", ["name", *keys, "created"],
                          lambda r: {"status": r.status, **{k: r.summary.get(k) for k in keys[1:]}})


def cmd_exports_show(args: argparse.Namespace) -> int:
    def render(data: dict[str, Any]) -> None:
        say(f"  status   {data.get('status', 'ready')}")
        say("  parents  " + ", ".join(f"{p['kind']} {p['name']}" for p in data["parents"]))
        say("  config   " + json.dumps(data["config"]))
        report = _parity(open_workspace(args).get("export", args.name))
        for line in parity_lines(report) if report else []:
            say(line)
        calibrated = _calibration_line(data.get("info") or {})
        if calibrated:
            say(calibrated)
        from appliance import licences

        found = data.get("info", {}).get("licenses") or []
        say("  licences " + ("\n           ".join(licences.summary(found)) if found else
                             "none recorded (made before licences were carried, or none was found)"))

    return show_artifact(args, "export", render)


def _calibration_line(info: dict[str, Any]) -> str | None:
    """What an export was calibrated on: its importance matrix (GGUF) or int4 layout (ONNX)."""
    what = "importance matrix" if info.get("imatrix") else "int4 8-bit layout"
    record = info.get("imatrix") or info.get("calibration")
    if not record:
        return None
    if not record.get("used"):
        return f"  calibration none ({what}: {record.get('why') or 'not used'})"
    data = record.get("calibration")
    source = (f"{data['conversations']} {data['split']} conversations of {data['dataset']} (run "
              f"{data['run']}; their sha256 in {data.get('hashes_file') or record.get('file')})"
              if data else record.get("path", "a file"))
    return f"  calibration {what} from {source}"


def cmd_exports_fit(args: argparse.Namespace) -> int:
    from pathlib import Path

    from appliance.runtime import engines, fit

    ws = open_workspace(args)
    prints = []
    for ref in args.names:
        art = engines.resolve(ref, ws, allow_failed_parity=True)
        context = fit.context_for(art.kind, Path(art.path), args.context or None)
        prints.append(fit.footprint(art.kind, Path(art.path), art.name, context))
    card = fit.this_card(args.card_gib)
    placement, lines = fit.report(prints, card)
    if args.json:
        print(json.dumps({"card": {"label": card.label, "total_mib": card.total_bytes / fit.MIB,
                                   "usable_mib": card.free_bytes / fit.MIB},
                          "overhead_mib": fit.CUDA_OVERHEAD / fit.MIB,
                          "models": [f.row() for f in prints], "fits": placement.fits,
                          "on_gpu": list(placement.on_gpu), "on_cpu": list(placement.on_cpu)},
                         indent=2))
    else:
        for line in lines:
            say(line)
    return ExitCode.OK if placement.fits else ExitCode.FAILED


def cmd_exports_frontier(args: argparse.Namespace) -> int:
    from appliance.stages.verify import frontier

    ws = open_workspace(args)
    ws.get("run", args.run)  # a clear error for a run that is not there
    rows = frontier.frontier(ws, args.run)
    if args.json:
        print(json.dumps({"run": args.run, "exports": frontier.rows_json(rows)}, indent=2))
        return ExitCode.OK
    if not rows:
        say(f"{args.run} has no GGUF or ONNX export yet: appliance export gguf {args.run} --quant "
            "Q8_0,Q4_K_M (or export onnx ... --precision int4,int8); each is scored as it is made")
        return ExitCode.OK
    _say_frontier(args.run, rows)
    if any(r.decode_tokens_per_s is None for r in rows):
        say("tok/s '-': gated before decode timing existed; `appliance verify EXPORT` times it")
    return ExitCode.OK


def register(sub: Any) -> None:
    from appliance.stages.merge import request as merge_request

    p = sub.add_parser("merge", help="merge a run's adapter into a full-precision copy of its base")
    complete(p.add_argument("run"), names("run"))
    p.add_argument("--dtype", choices=merge_request.DTYPES, default=merge_request.DEFAULT_DTYPE)
    p.add_argument("--base", choices=merge_request.BASES, default=merge_request.DEFAULT_BASE,
                   help="full: the base as imported; nf4: the base as training saw it (NF4 round trip)")
    p.add_argument("--detach", action="store_true", help="start the job and return")
    json_flag(p)
    p.set_defaults(func=cmd_merge)
    exp = sub.add_parser("export", help="export a run to GGUF or ONNX (merges first; parity-checked)")
    esub = exp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    from appliance.stages.export import DEFAULT_TYPES, GGUF_OFFERED, ONNX_PRECISIONS
    from appliance.stages.export.request import CALIBRATE_CHOICES, PLAN_TYPES

    for fmt, option, default, text in (
            ("gguf", "--quant", ",".join(DEFAULT_TYPES["gguf"]), "llama.cpp types, comma-separated "
             f"({', '.join(GGUF_OFFERED)}, ...)"),
            ("onnx", "--precision", ",".join(DEFAULT_TYPES["onnx"]),
             f"comma-separated: {', '.join(ONNX_PRECISIONS)} (fp16 and int4-cuda for CUDA GPUs; "
             "int4 for the CPU)")):
        p = esub.add_parser(fmt, help=f"export to {fmt.upper()}")
        complete(p.add_argument("run"), names("run"))
        p.add_argument(option, default=default, help=text)
        if fmt == "gguf":
            p.add_argument("--imatrix", default="auto", metavar="auto|off|FILE",
                           help="importance matrix for the types below 6 bits: auto (default) makes "
                                "one from the run's training conversations when llama.cpp's tools "
                                "are installed; off; or an imatrix file")
        else:
            p.add_argument("--calibrate", default="auto", choices=CALIBRATE_CHOICES,
                           help="int4: auto (default) keeps at 8 bits the weights measured most "
                                "sensitive on the run's training conversations; off keeps the fixed "
                                "layout (the head, down and v projections)")
        p.add_argument("--threshold", action="append", metavar="KEY=VALUE",
                       help="override a parity threshold: ppl_increase, kl or agreement")
        p.add_argument("--detach", action="store_true", help="start the job and return")
        json_flag(p, "the exports and their parity reports")
        p.set_defaults(func=cmd_export)
    p = esub.add_parser("plan", help="make the candidate exports of a run and list them side by side",
                        description="Export a run to each candidate type (GGUF with an importance "
                                    "matrix below 6 bits, ONNX int4 with its measured layout), each "
                                    "scored by the parity gate and timed on this box, in one job "
                                    "(GGUF first, then ONNX); then print the frontier (exports "
                                    "frontier RUN). Exports already made are reused.")
    complete(p.add_argument("run"), names("run"))
    p.add_argument("--gguf", default=",".join(PLAN_TYPES["gguf"]), metavar="TYPES",
                   help="GGUF candidates, comma-separated ('' for none)")
    p.add_argument("--onnx", default=",".join(PLAN_TYPES["onnx"]), metavar="PRECISIONS",
                   help="ONNX candidates, comma-separated ('' for none; fp16 is for CUDA)")
    p.add_argument("--imatrix", default="auto", metavar="auto|off|FILE", help="as for export gguf")
    p.add_argument("--calibrate", default="auto", choices=CALIBRATE_CHOICES, help="as for export onnx")
    p.add_argument("--detach", action="store_true", help="start the job and return")
    json_flag(p, "the job and the frontier, at the end")
    p.set_defaults(func=cmd_export_plan)
    p = sub.add_parser("verify", help="run the parity gate of an export again")
    complete(p.add_argument("export"), names("export"))
    p.add_argument("--threshold", action="append", metavar="KEY=VALUE")
    p.add_argument("--detach", action="store_true")
    json_flag(p, "the verdict and the parity report")
    p.set_defaults(func=cmd_verify)
    exs = sub.add_parser("exports", help="list, show and remove exports")
    xsub = exs.add_subparsers(metavar="ACTION", required=True)
    add_list(xsub, "list exports with their parity verdicts", cmd_exports_list)
    add_show(xsub, cmd_exports_show, "export")
    add_rm(xsub, "export")
    p = xsub.add_parser("fit", help="would these exports fit on the GPU (or a 16 GiB T4-class card)?",
                        description="Estimate the GPU memory of serving the exports together "
                                    "(weights, KV cache at the context, scratch, the CUDA context) "
                                    "from their headers, and place them on the card.")
    complete(p.add_argument("names", nargs="+", metavar="EXPORT"), names("export"))
    p.add_argument("--context", type=int, help="tokens of context (default: what serve opens with)")
    p.add_argument("--card-gib", type=float, help="plan for a card of this size (default: this box's "
                   "GPU 0, its free memory; 16 with no GPU)")
    json_flag(p, "the plan")
    p.set_defaults(func=cmd_exports_fit)
    p = xsub.add_parser("frontier", help="a run's exports side by side: size, Δppl, KL, agreement, tok/s",
                        description="Every GGUF and ONNX export of a run with its size, the parity "
                                    "gate's perplexity change, KL and greedy agreement on the run's "
                                    "held-out chats, and its greedy decode speed on this box; the "
                                    "exports no other one beats on size, Δppl and speed at once are "
                                    "marked: the trade-offs to choose from.")
    complete(p.add_argument("run"), names("run"))
    json_flag(p, "the rows")
    p.set_defaults(func=cmd_exports_frontier)
