"""`appliance eval TARGET...` (did the fine-tune help? a job: held-out answers from each target
through its own runtime, scored against the references, optionally judged by a local GGUF) and
`appliance evals list|show|rm|rubric`."""

from __future__ import annotations

import argparse
import json
from typing import Any

from appliance.cli.common import (
    add_list,
    add_rm,
    add_show,
    artifact_json,
    json_flag,
    list_artifacts,
    run_job,
    show_artifact,
)
from appliance.errors import ExitCode
from appliance.textout import open_workspace, say


def _doc(record: Any) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads((record.path / "eval.json").read_text(encoding="utf-8"))
    return doc


def _eval_report(ws: Any, job: Any) -> tuple[dict[str, Any], int]:
    record = ws.get("eval", job.result["eval"])  # the job's log has shown the table
    say(f"report: {record.path / 'report.md'} (again: appliance evals show {record.name})")
    return {"eval": artifact_json(record), "report": _doc(record)}, ExitCode.OK


def cmd_eval(args: argparse.Namespace) -> int:
    from appliance.stages.eval.request import EvalRequest

    request = EvalRequest.make(args.targets, args.data, limit=args.limit,
                               max_new_tokens=args.max_new_tokens, seed=args.seed, name=args.name,
                               judge=args.judge, rubric=args.rubric)
    if not request.problems():  # unknown targets, a judge that is no GGUF: refused before queueing
        from appliance.stages.eval import judge, targets

        ws = open_workspace(args)
        for target in request.targets:
            targets.find(ws, target)
        if request.judge:
            judge.resolve(ws, request.judge)
    return run_job(args, request.kind, request.to_params(), "eval", _eval_report)


def cmd_evals_list(args: argparse.Namespace) -> int:
    return list_artifacts(args, "eval", ["name", "targets", "data", "items", "created"],
                          lambda r: {"targets": ",".join(r.summary.get("targets", [])),
                                     "data": r.summary.get("data"), "items": r.summary.get("items")})


def cmd_evals_show(args: argparse.Namespace) -> int:
    from appliance.stages.eval import results

    def render(data: dict[str, Any]) -> None:
        say(results.table(_doc(open_workspace(args).get("eval", args.name))))
        say(f"report: {open_workspace(args).get('eval', args.name).path / 'report.md'}")

    return show_artifact(args, "eval", render)


def cmd_evals_rubric(args: argparse.Namespace) -> int:
    from appliance.stages.eval import rubric

    print(rubric.default_text(), end="")
    return 0


def register(sub: Any) -> None:
    from appliance.stages.eval import request

    p = sub.add_parser("eval", help="before/after: targets answer held-out chats, scored against "
                                    "the references")
    p.add_argument("targets", nargs="+", metavar="TARGET",
                   help="a model, run or export name (KIND:NAME where names collide); the first is "
                        "the base the others are compared with")
    p.add_argument("--data", metavar="DATASET|FILE",
                   help="a dataset's eval split, or a JSONL file in any import form (default: the "
                        "eval split of the dataset a target was trained on)")
    p.add_argument("--limit", type=int, default=request.DEFAULT_LIMIT, metavar="N",
                   help=f"the first N items (default {request.DEFAULT_LIMIT})")
    p.add_argument("--max-new-tokens", type=int, default=request.DEFAULT_MAX_NEW_TOKENS, metavar="N",
                   help=f"longest answer (default {request.DEFAULT_MAX_NEW_TOKENS})")
    p.add_argument("--seed", type=int, default=request.DEFAULT_SEED)
    p.add_argument("--name", help="the eval's name (default eval-JOB)")
    p.add_argument("--judge", metavar="MODEL_OR_EXPORT",
                   help="a local GGUF (an export, a model imported from a .gguf, or a .gguf file) "
                        "that compares each target's answers with the base's, both orders")
    p.add_argument("--rubric", metavar="FILE",
                   help="the judge's prompt (default: the shipped one; print it with "
                        "appliance evals rubric)")
    p.add_argument("--detach", action="store_true", help="start the job and return")
    json_flag(p, "the eval artifact and its report")
    p.set_defaults(func=cmd_eval)
    e = sub.add_parser("evals", help="list, show and remove evaluations")
    esub = e.add_subparsers(metavar="ACTION", required=True)
    add_list(esub, "list evaluations", cmd_evals_list)
    add_show(esub, cmd_evals_show, "eval")
    add_rm(esub, "eval")
    r = esub.add_parser("rubric", help="print the judge's default rubric (copy it, edit it, pass "
                                       "--rubric FILE)")
    r.set_defaults(func=cmd_evals_rubric)
