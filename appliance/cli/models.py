"""`appliance models import|list|show|rm`: base models."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from appliance.cli.common import (
    add_list,
    add_rm,
    add_show,
    artifact_json,
    job_json,
    json_flag,
    list_artifacts,
    show_artifact,
)
from appliance.errors import UsageError
from appliance.textout import human_count, open_workspace, print_json, say


def cmd_models_import(args: argparse.Namespace) -> int:
    from appliance import api
    from appliance.stages.models import importer as models

    ws = open_workspace(args)
    if args.default == bool(args.path):
        raise UsageError("give either a PATH (HF folder or .gguf file) or --default")
    if args.detach:
        from appliance.stages.models.request import ImportModelRequest

        template = args.chat_template and str(Path(args.chat_template).resolve())
        request = (ImportModelRequest(default=True, name=args.name or None, chat_template=template)
                   if args.default else
                   ImportModelRequest.for_path(args.path, args.name, args.chat_template))
        job = api.start_request(ws, request)
        say(f"started job {job.id}; follow it with `appliance jobs logs {job.id} --follow`")
        if args.json:
            print_json({"job": job_json(job)})
        return 0
    if args.default:
        record = models.import_default(ws, say=say)
    else:
        record = models.import_path(ws, Path(args.path), name=args.name,
                                    chat_template_file=args.chat_template and Path(args.chat_template),
                                    say=say)
    s = record.summary
    say(f"imported model {record.name!r}: {s.get('architecture')}, "
        f"{human_count(s.get('parameters'))} parameters, context {s.get('context_length')}, "
        f"{s.get('dtype')}\n  at {record.path}")
    if args.json:
        print_json(artifact_json(record))
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    return list_artifacts(args, "model", ["name", "architecture", "params", "context", "dtype", "created"],
                          lambda r: {"architecture": r.summary.get("architecture"),
                                     "params": human_count(r.summary.get("parameters")),
                                     "context": r.summary.get("context_length"),
                                     "dtype": r.summary.get("dtype")})


def cmd_models_show(args: argparse.Namespace) -> int:
    def render(data: dict[str, Any]) -> None:
        info = data["info"]
        for key in ("architecture", "parameters", "context_length", "vocab_size", "dtype",
                    "bos_token", "eos_token", "stop_tokens", "supports_system", "gguf_file"):
            if key in info:
                say(f"  {key:16} {info[key]}")
        say(f"  {'source':16} {data['config'].get('source')}")
        template = (info.get("chat_template") or "").replace("\n", "\\n")
        say(f"  {'chat_template':16} {template[:100]}{'...' if len(template) > 100 else ''}")

    return show_artifact(args, "model", render)


def register(sub: Any) -> None:
    models = sub.add_parser("models", help="import, list, show and remove base models")
    msub = models.add_subparsers(metavar="ACTION", required=True)
    p = msub.add_parser("import", help="import an HF folder (safetensors), a .gguf file, or "
                                       "--default (the embedded SmolLM2-135M-Instruct)")
    p.add_argument("path", nargs="?")
    p.add_argument("--default", action="store_true")
    p.add_argument("--name")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja chat template to use")
    p.add_argument("--detach", action="store_true", help="run as a background job")
    json_flag(p, "the imported model")
    p.set_defaults(func=cmd_models_import)
    add_list(msub, "list models", cmd_models_list)
    add_show(msub, cmd_models_show, "model")
    add_rm(msub, "model")
