"""`appliance train`, `appliance runs list|show|rm` and `appliance plan`: training and its memory plan."""

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
    follow,
    job_json,
    json_flag,
    list_artifacts,
    names,
    show_artifact,
)
from appliance.errors import ApplianceError, ExitCode, UsageError
from appliance.textout import open_workspace, print_json, say


def load_config(args: argparse.Namespace, model: Any) -> tuple[dict[str, Any], str, Any]:
    """Recipe + --set overrides, validated against the model (all problems at once)."""
    from appliance.stages.train import config as trainconfig

    values, source = trainconfig.load_recipe(args.recipe)
    values.update(dict(trainconfig.parse_override(o, "--set") for o in args.set or []))
    cfg = trainconfig.validate(values, source=source,
                               context_length=model.summary.get("context_length"))
    return values, source, cfg


def make_plan(model: Any, cfg: Any, target: str | None) -> Any:
    """The memory plan for a named target, else for the GPU found here; None without either."""
    from appliance.stages.train import planner

    spec = planner.target_named(target) if target else planner.detected_target()
    if spec is None:
        return None
    return planner.plan(planner.model_shape(model.path), cfg, spec)


def plan_json(model: Any, memory_plan: Any, cfg: Any) -> dict[str, Any]:
    from dataclasses import asdict

    e = memory_plan.estimate
    sizes = {"weights": e.weights, "activations": e.activations, "optimizer": e.optimizer,
             "cuda_context": e.context, "total": e.total}
    proposal = memory_plan.proposal
    return {"model": model.name, "target": asdict(memory_plan.target), "fits": memory_plan.fits,
            "batch_size": cfg.batch_size, "max_seq_len": cfg.max_seq_len,
            "estimate_gib": {k: round(v / 2**30, 3) for k, v in sizes.items()},
            "calibrated": e.calibrated,
            "proposal": proposal and {"batch_size": proposal[0], "max_seq_len": proposal[1]}}


def train_params(ws: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything before a job is queued, so mistakes show at once, all of them."""
    from appliance.stages.models.importer import require_trainable
    from appliance.stages.train.request import TrainRequest, default_run_name
    from appliance.stages.train.runs import check_new_run

    model = ws.get("model", args.model)
    require_trainable(model, "training")
    ws.get("dataset", args.dataset)
    values, source, cfg = load_config(args, model)
    memory_plan = make_plan(model, cfg, args.target)
    if memory_plan is not None:
        say(memory_plan.describe(cfg))
        if not memory_plan.fits and not args.force:
            raise ApplianceError("the run would not fit in GPU memory (see the plan above)",
                                 title="Does not fit", hint="apply the proposed values with --set, "
                                 "or --force to try anyway")
    name = args.name or default_run_name(args.model, args.dataset)
    check_new_run(ws, name, rename="pick another --name")
    return TrainRequest(args.model, args.dataset, values, source, name).to_params()


def cmd_train(args: argparse.Namespace) -> int:
    from appliance import api

    ws = open_workspace(args)
    job = api.start(ws, "train", train_params(ws, args))
    say(f"started training job {job.id} (it runs on if this command exits)")
    if not args.follow:
        say(f"follow it: appliance jobs logs {job.id} --follow")
        if args.json:
            print_json({"job": job_json(job)})
        return 0
    done = follow(ws, job)
    if args.json:
        run = done.state == "succeeded" and ws.get("run", done.params["name"])
        print_json({"job": job_json(done), "run": artifact_json(run) if run else None})
    return ExitCode.OK if done.state == "succeeded" else ExitCode.JOB_FAILED


def cmd_plan(args: argparse.Namespace) -> int:
    from appliance.stages.models.importer import require_trainable
    from appliance.stages.train import planner

    model = open_workspace(args).get("model", args.model)
    require_trainable(model, "planning a training run")
    _, _, cfg = load_config(args, model)
    memory_plan = make_plan(model, cfg, args.target)
    if memory_plan is None:
        raise UsageError("no CUDA GPU found here", title="Nothing to plan for",
                         hint=f"name one with --target ({', '.join(planner.TARGETS)})")
    if args.json:
        print_json(plan_json(model, memory_plan, cfg))
    else:
        say(memory_plan.describe(cfg))
    return ExitCode.OK if memory_plan.fits else ExitCode.FAILED


def cmd_runs_list(args: argparse.Namespace) -> int:
    keys = SUMMARY_KEYS["run"]
    return list_artifacts(args, "run", ["name", *keys, "created"],
                          lambda r: {k: r.summary.get(k) for k in keys})


def cmd_runs_show(args: argparse.Namespace) -> int:
    def render(data: dict[str, Any]) -> None:
        say("  parents  " + ", ".join(f"{p['kind']} {p['name']}" for p in data["parents"]))
        say(f"  job      {data['config'].get('job')}  device {data['config'].get('device')} "
            f"({data['config'].get('compute_dtype')})")
        for key, value in data["metrics"].items():
            say(f"  {key:24} {value}")
        say("  config   " + json.dumps(data["config"].get("train", {})))

    return show_artifact(args, "run", render)


def register(sub: Any) -> None:
    from appliance.stages.train.request import DEFAULT_RECIPE

    p = sub.add_parser("train", help="QLoRA-train a model on a dataset (a background job)")
    complete(p.add_argument("--model", required=True), names("model"))
    complete(p.add_argument("--dataset", required=True), names("dataset"))
    p.add_argument("--recipe", default=DEFAULT_RECIPE, help="shipped recipe name or a .toml file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--name", help="name of the run artifact (default MODEL-DATASET)")
    p.add_argument("--follow", "-f", action="store_true", help="show progress until it ends")
    p.add_argument("--target", help="plan memory for this GPU (default: the one found here)")
    p.add_argument("--force", action="store_true", help="start even if the plan says it won't fit")
    json_flag(p, "the job (and with --follow, how it ended and the run)")
    p.set_defaults(func=cmd_train)

    runs = sub.add_parser("runs", help="list, show and remove finished training runs")
    rsub = runs.add_subparsers(metavar="ACTION", required=True)
    add_list(rsub, "list runs", cmd_runs_list)
    add_show(rsub, cmd_runs_show, "run")
    add_rm(rsub, "run")

    p = sub.add_parser("plan", help="will a training config fit in GPU memory? what would?")
    complete(p.add_argument("--model", required=True), names("model"))
    p.add_argument("--recipe", default=DEFAULT_RECIPE)
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--target", help="a GPU: t4-16gb, l4-24gb, a10-24gb, a100-40gb, a100-80gb, "
                                    "h100-80gb (default: the one found here)")
    json_flag(p, "the plan")
    p.set_defaults(func=cmd_plan)
