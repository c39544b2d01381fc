"""`appliance data import|list|show|rm`: datasets."""

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
    show_artifact,
)
from appliance.textout import open_workspace, print_dataset_report, print_json, say


def cmd_data_import(args: argparse.Namespace) -> int:
    from appliance.stages.datasets import importer as datasets
    from appliance.stages.datasets.request import ImportDatasetRequest
    from appliance.stages.models.importer import require_trainable

    ws = open_workspace(args)
    model = ws.get("model", args.model)
    require_trainable(model, "importing a dataset")
    request = ImportDatasetRequest.for_path(args.file, args.model, name=args.name, form=args.format,
                                            eval_fraction=args.eval_fraction, seed=args.seed,
                                            max_tokens=args.max_tokens, license=args.license,
                                            attribution=args.attribution)
    record, report = datasets.run(ws, request, progress=lambda n: say(f"  ... {n} lines"))
    say(f"imported dataset {record.name!r} for model {model.name!r}\n  at {record.path}")
    print_dataset_report(report)
    if args.json:
        print_json({**artifact_json(record), "report": report})
    return 0


def cmd_data_list(args: argparse.Namespace) -> int:
    keys = SUMMARY_KEYS["dataset"]
    return list_artifacts(args, "dataset", ["name", *keys, "created"],
                          lambda r: {k: r.summary.get(k) for k in keys})


def cmd_data_show(args: argparse.Namespace) -> int:
    def render(data: dict[str, Any]) -> None:
        record = open_workspace(args).get("dataset", args.name)
        report = json.loads((record.path / "report.json").read_text(encoding="utf-8"))
        say(f"  source {data['config']['source']['path']}  (model {data['info']['summary']['model']})")
        print_dataset_report(report, limit=args.rejections)

    return show_artifact(args, "dataset", render)


def register(sub: Any) -> None:
    from appliance.stages.datasets import request as data_request

    data = sub.add_parser("data", help="import, list and show datasets")
    dsub = data.add_subparsers(metavar="ACTION", required=True)
    p = dsub.add_parser("import", help="import a JSONL dataset for a model")
    p.add_argument("file")
    complete(p.add_argument("--model", required=True, help="model whose tokenizer and template to use"),
             names("model"))
    p.add_argument("--name")
    p.add_argument("--format", default=data_request.DEFAULT_FORMAT, choices=data_request.FORMATS)
    p.add_argument("--eval-fraction", type=float, default=data_request.DEFAULT_EVAL_FRACTION)
    p.add_argument("--seed", type=int, default=data_request.DEFAULT_SEED)
    p.add_argument("--license", help="the data's licence as an SPDX id (e.g. CC-BY-SA-3.0); default: "
                                     "what LICENSE/ATTRIBUTION files beside the file say")
    p.add_argument("--attribution", help="the line that credits the data's authors")
    p.add_argument("--max-tokens", type=int, help="reject longer conversations "
                                                  "(default: the model's context length)")
    json_flag(p, "the dataset and its import report")
    p.set_defaults(func=cmd_data_import)
    add_list(dsub, "list datasets", cmd_data_list)
    show = add_show(dsub, cmd_data_show, "dataset")
    show.add_argument("--rejections", type=int, default=20, metavar="N",
                      help="how many rejected lines to print")
    add_rm(dsub, "dataset")
