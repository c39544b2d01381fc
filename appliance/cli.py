"""The `appliance` command. No arguments opens the TUI; subcommands do everything else.

Start-up must stay under a second: this module imports only the standard library and light parts
of the core at module scope; torch/transformers/Textual are imported inside the commands that use
them. The offline guard is installed before anything else runs.
"""

from __future__ import annotations

import argparse
import importlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from appliance import __version__, offline
from appliance.errors import ApplianceError, ValidationError

# Command groups that live beside the code they drive. Each module imports only the standard library
# at module scope and has `register(subparsers)`.
COMMAND_MODULES = ("appliance.runtime.console", "appliance.runtime.commands", "appliance.systemd")


def _workspace(args: argparse.Namespace) -> Any:
    from appliance.workspace import Workspace

    return Workspace(Path(args.home) if args.home else None)


def say(message: str) -> None:
    print(message, flush=True)


def _print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        print("(none)")
        return
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    print("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        print("  ".join(v.ljust(w) for v, w in zip(row, widths)))


def human_count(n: int | None) -> str:
    if not n:
        return "?"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= size:
            return f"{n / size:.1f}{unit}"
    return str(n)


# -- models ----------------------------------------------------------------------------------
def cmd_models_import(args: argparse.Namespace) -> int:
    from appliance import models

    ws = _workspace(args)
    if args.default == bool(args.path):
        raise ApplianceError("give either a PATH (HF folder or .gguf file) or --default",
                             title="Usage")
    if args.detach:
        from appliance import jobs

        params = {"default": args.default, "path": args.path and str(Path(args.path).resolve()),
                  "name": args.name, "chat_template": args.chat_template and
                  str(Path(args.chat_template).resolve())}
        job = jobs.start(ws, "import-model", params)
        say(f"started job {job.id}; follow it with `appliance jobs logs {job.id} --follow`")
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
    return 0


def cmd_models_list(args: argparse.Namespace) -> int:
    rows = [{"name": r.name, "architecture": r.summary.get("architecture"),
             "params": human_count(r.summary.get("parameters")),
             "context": r.summary.get("context_length"), "dtype": r.summary.get("dtype"),
             "created": r.created} for r in _workspace(args).list("model")]
    _print_table(rows, ["name", "architecture", "params", "context", "dtype", "created"])
    return 0


def _show(args: argparse.Namespace, kind: str, render: Callable[[dict[str, Any]], None]) -> int:
    from appliance import manifest

    record = _workspace(args).get(kind, args.name)
    data = manifest.verify(record.path, full=args.verify)
    if args.json:
        print(json.dumps(data, indent=2, ensure_ascii=False))
        return 0
    say(f"{kind} {record.name}  ({record.path})")
    render(data)
    total = sum(f["size"] for f in data["files"].values())
    check = "sha256 verified" if args.verify else "sizes checked; --verify hashes every file"
    say(f"files: {len(data['files'])}, {total / 2**20:.1f} MiB ({check})")
    return 0


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

    return _show(args, "model", render)


def cmd_rm(args: argparse.Namespace, kind: str) -> int:
    ws = _workspace(args)
    ws.get(kind, args.name)
    if not args.yes:
        if not sys.stdin.isatty():
            raise ApplianceError(f"refusing to remove {kind} {args.name!r} without --yes",
                                 title="Confirmation needed")
        if input(f"remove {kind} {args.name!r}? [y/N] ").strip().lower() not in ("y", "yes"):
            say("kept")
            return 1
    path = ws.remove(kind, args.name)
    say(f"removed {kind} {args.name!r} ({path})")
    return 0


# -- datasets --------------------------------------------------------------------------------
def print_dataset_report(report: dict[str, Any], limit: int = 20) -> None:
    tokens = report["tokens"]
    say(f"  form {report['form']}: {report['lines']} lines -> {report['kept']} kept "
        f"({report['train']} train / {report['eval']} eval), {report['rejected']} rejected, "
        f"{report['duplicates']} exact duplicates removed")
    if tokens.get("count"):
        say(f"  tokens per conversation: min {tokens['min']}, p50 {tokens['p50']}, "
            f"mean {tokens['mean']}, p95 {tokens['p95']}, max {tokens['max']} "
            f"(total {tokens['total']})")
    for reason, count in sorted(report["rejected_by_reason"].items()):
        say(f"  rejected {reason}: {count}")
    for row in report["rejections"][:limit]:
        say(f"    line {row['line']}: {row['reason']}")
    if len(report["rejections"]) > limit:
        say(f"    ... {len(report['rejections']) - limit} more (appliance data show NAME "
            "--rejections N)")
    for dup in report["duplicate_lines"][:limit]:
        say(f"    line {dup['line']}: duplicate of line {dup['duplicate_of']}")


def cmd_data_import(args: argparse.Namespace) -> int:
    from appliance import datasets

    ws = _workspace(args)
    model = ws.get("model", args.model)
    record, report = datasets.import_file(
        ws, Path(args.file), model, name=args.name, form=args.format,
        eval_fraction=args.eval_fraction, seed=args.seed, max_tokens=args.max_tokens,
        progress=lambda n: say(f"  ... {n} lines"))
    say(f"imported dataset {record.name!r} for model {model.name!r}\n  at {record.path}")
    print_dataset_report(report)
    return 0


def cmd_data_list(args: argparse.Namespace) -> int:
    rows = [{"name": r.name, **{k: r.summary.get(k) for k in
                                ("model", "form", "train", "eval", "rejected", "duplicates")},
             "created": r.created} for r in _workspace(args).list("dataset")]
    _print_table(rows, ["name", "model", "form", "train", "eval", "rejected", "duplicates",
                        "created"])
    return 0


def cmd_data_show(args: argparse.Namespace) -> int:
    def render(data: dict[str, Any]) -> None:
        record = _workspace(args).get("dataset", args.name)
        report = json.loads((record.path / "report.json").read_text(encoding="utf-8"))
        say(f"  source {data['config']['source']['path']}  (model {data['info']['summary']['model']})")
        print_dataset_report(report, limit=args.rejections)

    return _show(args, "dataset", render)


# -- training --------------------------------------------------------------------------------
def load_config(args: argparse.Namespace, model: Any) -> tuple[dict[str, Any], str, Any]:
    """Recipe + --set overrides, validated against the model (all problems at once)."""
    from appliance import trainconfig

    values, source = trainconfig.load_recipe(args.recipe)
    values.update(dict(trainconfig.parse_override(o) for o in args.set or []))
    cfg = trainconfig.validate(values, source=source,
                               context_length=model.summary.get("context_length"))
    return values, source, cfg


def train_params(ws: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything before a job is queued, so mistakes show at once, all of them."""
    from appliance.runs import check_new_run

    model = ws.get("model", args.model)
    ws.get("dataset", args.dataset)
    values, source, cfg = load_config(args, model)
    memory_plan = make_plan(model, cfg, args.target)
    if memory_plan is not None:
        say(memory_plan.describe(cfg))
        if not memory_plan.fits and not args.force:
            raise ApplianceError("the run would not fit in GPU memory (see the plan above)",
                                 title="Does not fit", hint="apply the proposed values with --set, "
                                 "or --force to try anyway")
    name = args.name or f"{args.model}-{args.dataset}"
    check_new_run(ws, name, rename="pick another --name")
    return {"model": args.model, "dataset": args.dataset, "config": values, "source": source,
            "name": name}


def cmd_runs_list(args: argparse.Namespace) -> int:
    rows = [{"name": r.name, **{k: r.summary.get(k) for k in ("model", "dataset", "steps",
                                                            "perplexity_before", "perplexity_after")},
             "created": r.created} for r in _workspace(args).list("run")]
    _print_table(rows, ["name", "model", "dataset", "steps", "perplexity_before", "perplexity_after",
                        "created"])
    return 0


def cmd_runs_show(args: argparse.Namespace) -> int:
    def render(data: dict[str, Any]) -> None:
        say("  parents  " + ", ".join(f"{p['kind']} {p['name']}" for p in data["parents"]))
        say(f"  job      {data['config'].get('job')}  device {data['config'].get('device')} "
            f"({data['config'].get('compute_dtype')})")
        for key, value in data["metrics"].items():
            say(f"  {key:24} {value}")
        say("  config   " + json.dumps(data["config"].get("train", {})))

    return _show(args, "run", render)


# -- merge, export, verify -------------------------------------------------------------------
def _run_job(args: argparse.Namespace, kind: str, params: dict[str, Any], what: str) -> int:
    """Start a detached job; follow it unless --detach (closing the terminal does not stop it)."""
    from appliance import jobs

    ws = _workspace(args)
    job = jobs.start(ws, kind, params)
    say(f"started {what} job {job.id} (it runs on if this command exits)")
    if args.detach:
        say(f"follow it: appliance jobs logs {job.id} --follow")
        return 0
    for event in jobs.follow(ws, job.id):
        say(format_event(event))
    done = jobs.get(ws, job.id)
    if done.state == "succeeded" and done.result.get("passed") is False:
        say("parity gate FAILED (marked failed in the registry)")
        return 2
    if done.state == "succeeded" and done.result.get("exports"):
        failed = [n for n, status in done.result["exports"].items() if status == "failed"]
        if failed:
            say(f"parity gate FAILED for: {', '.join(failed)} (marked failed in the registry)")
            return 2
    return 0 if done.state == "succeeded" else 1


def _thresholds(items: list[str] | None) -> dict[str, float]:
    from appliance.trainconfig import parse_override

    allowed = ("ppl_increase", "kl", "agreement")
    out = {}
    for item in items or []:
        key, value = parse_override(item)
        if key not in allowed or not isinstance(value, int | float):
            raise ValidationError(f"--threshold {item!r}: expected one of {', '.join(allowed)}=NUMBER")
        out[key] = float(value)
    return out


def _types(text: str) -> list[str]:
    return [t.strip() for t in text.split(",") if t.strip()]


def cmd_merge(args: argparse.Namespace) -> int:
    return _run_job(args, "merge", {"run": args.run, "dtype": args.dtype, "base": args.base}, "merge")


def cmd_export(args: argparse.Namespace) -> int:
    types = _types(args.quant if args.format == "gguf" else args.precision)
    params = {"run": args.run, "format": args.format, "types": types,
              "overrides": _thresholds(args.threshold)}
    return _run_job(args, "export", params, f"{args.format} export")


def cmd_verify(args: argparse.Namespace) -> int:
    return _run_job(args, "verify", {"export": args.export, "overrides": _thresholds(args.threshold)},
                    "parity")


def cmd_exports_list(args: argparse.Namespace) -> int:
    rows = [{"name": r.name, "status": r.status,
             **{k: r.summary.get(k) for k in ("format", "type", "run", "parity")},
             "created": r.created} for r in _workspace(args).list("export")]
    _print_table(rows, ["name", "status", "format", "type", "run", "parity", "created"])
    return 0


def cmd_exports_show(args: argparse.Namespace) -> int:
    from appliance import parity

    def render(data: dict[str, Any]) -> None:
        say(f"  status   {data.get('status', 'ready')}")
        say("  parents  " + ", ".join(f"{p['kind']} {p['name']}" for p in data["parents"]))
        say("  config   " + json.dumps(data["config"]))
        report = _workspace(args).get("export", args.name).path / "parity.json"
        if report.exists():
            say(parity.table(json.loads(report.read_text())))

    return _show(args, "export", render)


def make_plan(model: Any, cfg: Any, target: str | None) -> Any:
    """The memory plan for a named target, else for the GPU found here; None without either."""
    from appliance import planner

    spec = planner.target_named(target) if target else planner.detected_target()
    if spec is None:
        return None
    return planner.plan(planner.model_shape(model.path), cfg, spec)


def cmd_plan(args: argparse.Namespace) -> int:
    from appliance import planner

    model = _workspace(args).get("model", args.model)
    _, _, cfg = load_config(args, model)
    memory_plan = make_plan(model, cfg, args.target)
    if memory_plan is None:
        raise ApplianceError("no CUDA GPU found here", title="Nothing to plan for",
                             hint=f"name one with --target ({', '.join(planner.TARGETS)})")
    say(memory_plan.describe(cfg))
    return 0 if memory_plan.fits else 1


def cmd_train(args: argparse.Namespace) -> int:
    from appliance import jobs

    ws = _workspace(args)
    job = jobs.start(ws, "train", train_params(ws, args))
    say(f"started training job {job.id} (it runs on if this command exits)")
    if not args.follow:
        say(f"follow it: appliance jobs logs {job.id} --follow")
        return 0
    for event in jobs.follow(ws, job.id):
        say(format_event(event))
    return 0 if jobs.get(ws, job.id).state == "succeeded" else 1


# -- jobs ------------------------------------------------------------------------------------
def format_event(event: dict[str, Any]) -> str:
    from appliance import progress

    kind = event.get("type")
    if progress.is_staged(event):  # merge / export / verify: the stage, and what is counted
        return progress.describe(event)
    if kind == "progress":
        extra = " ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}"
                         for k, v in event.items() if k not in ("ts", "type", "done", "total", "step"))
        return f"step {event['done']}/{event['total']} {extra}".rstrip()
    if kind == "eval":
        return (f"eval at step {event['step']}: loss {event['eval_loss']:.4f}, perplexity "
                f"{event['perplexity']:.3f}{' (best so far)' if event.get('best') else ''}")
    if kind == "state":
        return f"state -> {event['state']}" + (f": {event['message']}" if event.get("message") else "")
    if kind == "log":
        return event["message"]
    return json.dumps(event, ensure_ascii=False)


def cmd_jobs_list(args: argparse.Namespace) -> int:
    from appliance import jobs

    rows = [{"id": j.id, "kind": j.kind, "state": j.state, "attempt": j.attempt,
             "created": j.created, "message": j.message[:60]} for j in jobs.list_jobs(_workspace(args))]
    _print_table(rows, ["id", "kind", "state", "attempt", "created", "message"])
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    from dataclasses import asdict

    from appliance import jobs

    print(json.dumps(asdict(jobs.get(_workspace(args), args.id)), indent=2))
    return 0


def cmd_jobs_logs(args: argparse.Namespace) -> int:
    from appliance import jobs

    ws = _workspace(args)
    jobs.get(ws, args.id)
    events = jobs.follow(ws, args.id) if args.follow else iter(jobs.read_events(ws, args.id))
    for event in events:
        say(format_event(event))
    return 0


def cmd_jobs_action(args: argparse.Namespace, action: str) -> int:
    from appliance import jobs

    ws = _workspace(args)
    if action == "run":
        job = jobs.run(ws, args.id)
        return 0 if job.state == "succeeded" else 1
    job = jobs.cancel(ws, args.id) if action == "cancel" else jobs.resume(ws, args.id)
    say(f"job {job.id}: {job.state}" + (" (cancel requested)" if action == "cancel" else ""))
    return 0


def cmd_jobs_worker(args: argparse.Namespace) -> int:
    from appliance.distributed import run_worker

    return run_worker(_workspace(args), args.id)


def cmd_jobs_selftest(args: argparse.Namespace) -> int:
    from appliance import jobs

    job = jobs.start(_workspace(args), "selftest", {"steps": args.steps, "interval": args.interval})
    say(f"started job {job.id}")
    return 0


# -- the rest --------------------------------------------------------------------------------
def cmd_doctor(args: argparse.Namespace) -> int:
    from appliance import doctor

    report = doctor.collect(_workspace(args))
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        doctor.print_report(report, say)
    return 0 if not report["missing"] else 1


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance import demo

    return demo.run(_workspace(args), say)


def cmd_tui(args: argparse.Namespace) -> int:
    from tui.app import run

    return run(_workspace(args))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="Offline LLM adaptation and deployment. Run with no command for the TUI.")
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    parser.add_argument("--home", help="workspace directory (default: $APPLIANCE_HOME or "
                                       "~/.local/share/appliance)")
    parser.set_defaults(func=cmd_tui)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")

    models = sub.add_parser("models", help="import, list, show and remove base models")
    msub = models.add_subparsers(metavar="ACTION", required=True)
    p = msub.add_parser("import", help="import an HF folder (safetensors), a .gguf file, or "
                                       "--default (the embedded SmolLM2-135M-Instruct)")
    p.add_argument("path", nargs="?")
    p.add_argument("--default", action="store_true")
    p.add_argument("--name")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja chat template to use")
    p.add_argument("--detach", action="store_true", help="run as a background job")
    p.set_defaults(func=cmd_models_import)
    msub.add_parser("list", help="list models").set_defaults(func=cmd_models_list)
    _add_show(msub, cmd_models_show)
    _add_rm(msub, "model")

    data = sub.add_parser("data", help="import, list and show datasets")
    dsub = data.add_subparsers(metavar="ACTION", required=True)
    p = dsub.add_parser("import", help="import a JSONL dataset for a model")
    p.add_argument("file")
    p.add_argument("--model", required=True, help="model whose tokenizer and template to use")
    p.add_argument("--name")
    p.add_argument("--format", default="auto",
                   choices=["auto", "messages", "sharegpt", "alpaca", "dolly"])
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, help="reject longer conversations "
                                                  "(default: the model's context length)")
    p.set_defaults(func=cmd_data_import)
    dsub.add_parser("list", help="list datasets").set_defaults(func=cmd_data_list)
    show = _add_show(dsub, cmd_data_show)
    show.add_argument("--rejections", type=int, default=20, metavar="N",
                      help="how many rejected lines to print")
    _add_rm(dsub, "dataset")

    p = sub.add_parser("train", help="QLoRA-train a model on a dataset (a background job)")
    p.add_argument("--model", required=True)
    p.add_argument("--dataset", required=True)
    p.add_argument("--recipe", default="smollm2-cpu", help="shipped recipe name or a .toml file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--name", help="name of the run artifact (default MODEL-DATASET)")
    p.add_argument("--follow", "-f", action="store_true", help="show progress until it ends")
    p.add_argument("--target", help="plan memory for this GPU (default: the one found here)")
    p.add_argument("--force", action="store_true", help="start even if the plan says it won't fit")
    p.set_defaults(func=cmd_train)

    runs = sub.add_parser("runs", help="list, show and remove finished training runs")
    rsub = runs.add_subparsers(metavar="ACTION", required=True)
    rsub.add_parser("list", help="list runs").set_defaults(func=cmd_runs_list)
    _add_show(rsub, cmd_runs_show)
    _add_rm(rsub, "run")

    p = sub.add_parser("plan", help="will a training config fit in GPU memory? what would?")
    p.add_argument("--model", required=True)
    p.add_argument("--recipe", default="smollm2-cpu")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--target", help="a GPU: t4-16gb, l4-24gb, a10-24gb, a100-40gb, a100-80gb, "
                                    "h100-80gb (default: the one found here)")
    p.set_defaults(func=cmd_plan)

    p = sub.add_parser("merge", help="merge a run's adapter into a full-precision copy of its base")
    p.add_argument("run")
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    p.add_argument("--base", choices=("full", "nf4"), default="full",
                   help="full: the base as imported; nf4: the base as training saw it (NF4 round trip)")
    p.add_argument("--detach", action="store_true", help="start the job and return")
    p.set_defaults(func=cmd_merge)
    exp = sub.add_parser("export", help="export a run to GGUF or ONNX (merges first; parity-checked)")
    esub = exp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    for fmt, option, default, text in (
            ("gguf", "--quant", "Q8_0,Q4_K_M", "llama.cpp types, comma-separated (F16, Q8_0, Q6_K, "
             "Q5_K_M, Q4_K_M, ...)"),
            ("onnx", "--precision", "int4", "comma-separated: fp32, fp16 (CUDA), int8, int4")):
        p = esub.add_parser(fmt, help=f"export to {fmt.upper()}")
        p.add_argument("run")
        p.add_argument(option, default=default, help=text)
        p.add_argument("--threshold", action="append", metavar="KEY=VALUE",
                       help="override a parity threshold: ppl_increase, kl or agreement")
        p.add_argument("--detach", action="store_true", help="start the job and return")
        p.set_defaults(func=cmd_export)
    p = sub.add_parser("verify", help="run the parity gate of an export again")
    p.add_argument("export")
    p.add_argument("--threshold", action="append", metavar="KEY=VALUE")
    p.add_argument("--detach", action="store_true")
    p.set_defaults(func=cmd_verify)
    exs = sub.add_parser("exports", help="list, show and remove exports")
    xsub = exs.add_subparsers(metavar="ACTION", required=True)
    xsub.add_parser("list", help="list exports with their parity verdicts").set_defaults(
        func=cmd_exports_list)
    _add_show(xsub, cmd_exports_show)
    _add_rm(xsub, "export")

    jobs = sub.add_parser("jobs", help="list, follow, cancel and resume background jobs")
    jsub = jobs.add_subparsers(metavar="ACTION", required=True)
    jsub.add_parser("list", help="all jobs").set_defaults(func=cmd_jobs_list)
    for action, text in (("show", "a job's record"), ("logs", "a job's events"),
                         ("cancel", "ask a job to stop (it saves its state first)"),
                         ("resume", "continue an interrupted, failed or cancelled job"),
                         ("run", "run a queued job in this process (used by spawn and systemd)")):
        p = jsub.add_parser(action, help=text)
        p.add_argument("id")
        if action == "logs":
            p.add_argument("--follow", "-f", action="store_true")
        funcs = {"show": cmd_jobs_show, "logs": cmd_jobs_logs}
        p.set_defaults(func=funcs.get(action, lambda a, act=action: cmd_jobs_action(a, act)))
    p = jsub.add_parser("worker")  # one rank of a data-parallel job, started by torchrun
    p.add_argument("id")
    p.set_defaults(func=cmd_jobs_worker)
    p = jsub.add_parser("selftest", help="a small detached job to check jobs work on this box")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.5)
    p.set_defaults(func=cmd_jobs_selftest)

    p = sub.add_parser("doctor", help="check the installation, hardware and offline status")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_doctor)
    sub.add_parser("demo", help="run the pipeline on the embedded default model").set_defaults(
        func=cmd_demo)
    sub.add_parser("tui", help="open the terminal UI (the default)").set_defaults(func=cmd_tui)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    return parser


def _add_show(sub: Any, func: Callable[[argparse.Namespace], int]) -> argparse.ArgumentParser:
    p = sub.add_parser("show", help="details, checked against the manifest")
    p.add_argument("name")
    p.add_argument("--verify", action="store_true", help="recompute every file's sha256")
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.set_defaults(func=func)
    return p


def _add_rm(sub: Any, kind: str) -> None:
    p = sub.add_parser("rm", help=f"remove a {kind}")
    p.add_argument("name")
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=lambda args: cmd_rm(args, kind))


def main(argv: Sequence[str] | None = None) -> int:
    offline.install()
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except ApplianceError as exc:
        print(f"error: {exc.title}: {exc}", file=sys.stderr)
        return 2
    except offline.NetworkBlockedError as exc:
        print(f"error: {exc.title}: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
