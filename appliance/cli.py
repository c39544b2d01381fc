"""The `appliance` command. No arguments opens the TUI; subcommands do everything else.

Start-up must stay under a second: this module imports only the standard library and light parts
of the core at module scope; torch/transformers/Textual are imported inside the commands that use
them (argcomplete too, only when the shell asks for completions). The offline guard is installed
before anything else runs.

Scripts are first-class users: every list and every result takes `--json` (one JSON document on
stdout, the human progress on stderr), each kind of failure has its own exit code (`ExitCode` in
appliance/errors.py, documented in the README), and a reader that closes the pipe early (`| head`)
ends the command quietly with 141, as a shell reports a process killed by SIGPIPE.
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import select
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from appliance import __version__, offline
from appliance.errors import ApplianceError, ExitCode, UsageError, ValidationError
from appliance.textout import HumanOutput, format_event, human_count, print_dataset_report, print_json, say
from appliance.textout import open_workspace as _workspace

# Command groups that live beside the code they drive. Each module imports only the standard library
# at module scope and has `register(subparsers)`.
COMMAND_MODULES = ("appliance.runtime.console", "appliance.runtime.commands", "appliance.systemd")
BROKEN_PIPE = 141  # 128 + SIGPIPE: what a shell shows for a writer whose reader went away
SHELLS = ("bash", "zsh", "fish")


def _print_table(rows: list[dict[str, Any]], columns: Sequence[str]) -> None:
    if not rows:
        say("(none)")
        return
    cells = [[str(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(columns)]
    say("  ".join(c.upper().ljust(w) for c, w in zip(columns, widths)))
    for row in cells:
        say("  ".join(v.ljust(w) for v, w in zip(row, widths)))


# What `list --json` (and the results of imports and jobs) give for each artifact, besides name,
# status, created and path: the artifact's summary keys, raw (no "135.0M").
SUMMARY_KEYS = {
    "model": ("architecture", "parameters", "context_length", "dtype"),
    "dataset": ("model", "form", "train", "eval", "rejected", "duplicates"),
    "run": ("model", "dataset", "steps", "perplexity_before", "perplexity_after"),
    "export": ("format", "type", "run", "parity"),
}


def artifact_json(record: Any) -> dict[str, Any]:
    return {"name": record.name, "status": record.status, "created": record.created,
            "path": str(record.path), **{k: record.summary.get(k) for k in SUMMARY_KEYS[record.kind]}}


def job_json(job: Any) -> dict[str, Any]:
    """A job as `jobs show` prints it."""
    from dataclasses import asdict

    return asdict(job)


def _list(args: argparse.Namespace, kind: str, columns: Sequence[str],
          human: Callable[[Any], dict[str, Any]]) -> int:
    records = _workspace(args).list(kind)
    if args.json:
        print_json([artifact_json(r) for r in records])
    else:
        _print_table([{**human(r), "name": r.name, "created": r.created} for r in records], columns)
    return 0


def _confirm(question: str, refusal: str) -> bool:
    """Ask on the terminal; without one, refuse (a script must say --yes)."""
    if not sys.stdin.isatty():
        raise UsageError(refusal, title="Confirmation needed", hint="pass --yes")
    print(f"{question} [y/N] ", end="", file=sys.stderr if HumanOutput.to_stderr else sys.stdout, flush=True)
    return input().strip().lower() in ("y", "yes")


# -- models ----------------------------------------------------------------------------------
def cmd_models_import(args: argparse.Namespace) -> int:
    from appliance import api
    from appliance.stages.models import importer as models

    ws = _workspace(args)
    if args.default == bool(args.path):
        raise UsageError("give either a PATH (HF folder or .gguf file) or --default")
    if args.detach:

        params = {"default": args.default, "path": args.path and str(Path(args.path).resolve()),
                  "name": args.name, "chat_template": args.chat_template and
                  str(Path(args.chat_template).resolve())}
        job = api.start(ws, "import-model", params)
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
    return _list(args, "model", ["name", "architecture", "params", "context", "dtype", "created"],
                 lambda r: {"architecture": r.summary.get("architecture"),
                            "params": human_count(r.summary.get("parameters")),
                            "context": r.summary.get("context_length"), "dtype": r.summary.get("dtype")})


def _show(args: argparse.Namespace, kind: str, render: Callable[[dict[str, Any]], None]) -> int:
    from appliance import manifest

    record = _workspace(args).get(kind, args.name)
    data = manifest.verify(record.path, full=args.verify)
    if args.json:
        print_json(data)
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
    if not args.yes and not _confirm(f"remove {kind} {args.name!r}?",
                                     f"refusing to remove {kind} {args.name!r} without --yes"):
        say("kept")
        return ExitCode.FAILED
    path = ws.remove(kind, args.name)
    say(f"removed {kind} {args.name!r} ({path})")
    return 0


# -- datasets --------------------------------------------------------------------------------
def cmd_data_import(args: argparse.Namespace) -> int:
    from appliance.stages.datasets import importer as datasets

    ws = _workspace(args)
    model = ws.get("model", args.model)
    record, report = datasets.import_file(
        ws, Path(args.file), model, name=args.name, form=args.format,
        eval_fraction=args.eval_fraction, seed=args.seed, max_tokens=args.max_tokens,
        progress=lambda n: say(f"  ... {n} lines"))
    say(f"imported dataset {record.name!r} for model {model.name!r}\n  at {record.path}")
    print_dataset_report(report)
    if args.json:
        print_json({**artifact_json(record), "report": report})
    return 0


def cmd_data_list(args: argparse.Namespace) -> int:
    keys = SUMMARY_KEYS["dataset"]
    return _list(args, "dataset", ["name", *keys, "created"],
                 lambda r: {k: r.summary.get(k) for k in keys})


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
    from appliance.stages.train import config as trainconfig

    values, source = trainconfig.load_recipe(args.recipe)
    values.update(dict(trainconfig.parse_override(o) for o in args.set or []))
    cfg = trainconfig.validate(values, source=source,
                               context_length=model.summary.get("context_length"))
    return values, source, cfg


def train_params(ws: Any, args: argparse.Namespace) -> dict[str, Any]:
    """Validate everything before a job is queued, so mistakes show at once, all of them."""
    from appliance.stages.train.runs import check_new_run

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
    keys = SUMMARY_KEYS["run"]
    return _list(args, "run", ["name", *keys, "created"], lambda r: {k: r.summary.get(k) for k in keys})


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
JobReport = Callable[[Any, Any], tuple[dict[str, Any], int]]


def _follow(ws: Any, job: Any) -> Any:
    """Print a job's events until it ends (to stderr under --json); the job as it ended."""
    from appliance import jobs

    for event in jobs.follow(ws, job.id):
        say(format_event(event))
    return jobs.get(ws, job.id)


def _run_job(args: argparse.Namespace, kind: str, params: dict[str, Any], what: str,
             report: JobReport) -> int:
    """Start a detached job; follow it unless --detach (closing the terminal does not stop it).
    A job that did not succeed exits 7; `report` judges a succeeded one and adds its results."""
    from appliance import api

    ws = _workspace(args)
    job = api.start(ws, kind, params)
    say(f"started {what} job {job.id} (it runs on if this command exits)")
    if args.detach:
        say(f"follow it: appliance jobs logs {job.id} --follow")
        if args.json:
            print_json({"job": job_json(job)})
        return 0
    done = _follow(ws, job)
    doc: dict[str, Any] = {"job": job_json(done)}
    code: int = ExitCode.JOB_FAILED
    if done.state == "succeeded":
        extra, code = report(ws, done)
        doc.update(extra)
    if args.json:
        print_json(doc)
    return int(code)


def _thresholds(items: list[str] | None) -> dict[str, float]:
    from appliance.stages.train.config import parse_override

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
    return _run_job(args, "merge", {"run": args.run, "dtype": args.dtype, "base": args.base}, "merge",
                    _merge_report)


def cmd_export(args: argparse.Namespace) -> int:
    types = _types(args.quant if args.format == "gguf" else args.precision)
    params = {"run": args.run, "format": args.format, "types": types,
              "overrides": _thresholds(args.threshold)}
    return _run_job(args, "export", params, f"{args.format} export", _export_report)


def cmd_verify(args: argparse.Namespace) -> int:
    return _run_job(args, "verify", {"export": args.export, "overrides": _thresholds(args.threshold)},
                    "parity", _verify_report)


def cmd_exports_list(args: argparse.Namespace) -> int:
    keys = ("status", *SUMMARY_KEYS["export"])
    return _list(args, "export", ["name", *keys, "created"],
                 lambda r: {"status": r.status, **{k: r.summary.get(k) for k in keys[1:]}})


def cmd_exports_show(args: argparse.Namespace) -> int:
    def render(data: dict[str, Any]) -> None:
        say(f"  status   {data.get('status', 'ready')}")
        say("  parents  " + ", ".join(f"{p['kind']} {p['name']}" for p in data["parents"]))
        say("  config   " + json.dumps(data["config"]))
        report = _parity(_workspace(args).get("export", args.name))
        for line in parity_lines(report) if report else []:
            say(line)

    return _show(args, "export", render)


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


def cmd_plan(args: argparse.Namespace) -> int:
    from appliance.stages.train import planner

    model = _workspace(args).get("model", args.model)
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


def cmd_train(args: argparse.Namespace) -> int:
    from appliance import api

    ws = _workspace(args)
    job = api.start(ws, "train", train_params(ws, args))
    say(f"started training job {job.id} (it runs on if this command exits)")
    if not args.follow:
        say(f"follow it: appliance jobs logs {job.id} --follow")
        if args.json:
            print_json({"job": job_json(job)})
        return 0
    done = _follow(ws, job)
    if args.json:
        run = done.state == "succeeded" and ws.get("run", done.params["name"])
        print_json({"job": job_json(done), "run": artifact_json(run) if run else None})
    return ExitCode.OK if done.state == "succeeded" else ExitCode.JOB_FAILED


# -- jobs ------------------------------------------------------------------------------------
def cmd_jobs_list(args: argparse.Namespace) -> int:
    from appliance import jobs

    found = jobs.list_jobs(_workspace(args))
    if args.json:
        print_json([job_json(j) for j in found])
        return 0
    rows = [{"id": j.id, "kind": j.kind, "state": j.state, "attempt": j.attempt,
             "created": j.created, "message": j.message[:60]} for j in found]
    _print_table(rows, ["id", "kind", "state", "attempt", "created", "message"])
    return 0


def cmd_jobs_show(args: argparse.Namespace) -> int:
    from appliance import jobs

    print_json(job_json(jobs.get(_workspace(args), args.id)))
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
    from appliance import api, jobs

    ws = _workspace(args)
    if action == "run":
        job = api.run(ws, args.id)
        return ExitCode.OK if job.state == "succeeded" else ExitCode.JOB_FAILED
    job = jobs.cancel(ws, args.id) if action == "cancel" else jobs.resume(ws, args.id)
    say(f"job {job.id}: {job.state}" + (" (cancel requested)" if action == "cancel" else ""))
    return 0


def cmd_jobs_worker(args: argparse.Namespace) -> int:
    from appliance import stages
    from appliance.stages.train.distributed import run_worker

    return run_worker(_workspace(args), args.id, stages.KINDS["train"])


def cmd_jobs_selftest(args: argparse.Namespace) -> int:
    from appliance import api

    job = api.start(_workspace(args), "selftest", {"steps": args.steps, "interval": args.interval})
    say(f"started job {job.id}")
    return 0


# -- the rest --------------------------------------------------------------------------------
def cmd_doctor(args: argparse.Namespace) -> int:
    from appliance import doctor

    if args.clean:
        return cmd_doctor_clean(args)
    report = doctor.collect(_workspace(args))
    if args.json:
        print_json(report)
    else:
        doctor.print_report(report, say)
    return ExitCode.OK if not report["missing"] else ExitCode.FAILED


def _tree_size(path: Path) -> int:
    """Bytes under `path` (its files' sizes, links not followed)."""
    total = 0
    for folder, _, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                pass
    return total


def _staging_leftovers(ws: Any) -> dict[Path, int]:
    """The hidden staging folders in the workspace, with their sizes: what the operator is asked
    about. `doctor.remove_leftovers` decides what is really left over (no live writer holds it)."""
    from appliance.workspace import KIND_DIRS, STAGING_PREFIX

    found = {}
    for sub in KIND_DIRS.values():
        for path in sorted((ws.root / sub).glob(f"{STAGING_PREFIX}*")):
            if path.is_dir() and not path.is_symlink():
                found[path] = _tree_size(path)
    return found


def _mib(size: int) -> str:
    return f"{size / 2**20:.1f} MiB"


def cmd_doctor_clean(args: argparse.Namespace) -> int:
    """Remove the staging folders that killed imports and exports left behind."""
    from appliance import doctor

    ws = _workspace(args)
    found = _staging_leftovers(ws)
    for path, size in found.items():
        say(f"leftover {path} ({_mib(size)})")
    if found and not args.yes and not _confirm(
            f"remove {len(found)} leftover folder(s), {_mib(sum(found.values()))}?",
            f"refusing to remove {len(found)} leftover folder(s) without --yes"):
        say("kept")
        return ExitCode.FAILED
    removed = doctor.remove_leftovers(ws) if found else []
    freed = sum(found.get(Path(p), 0) for p in removed)
    for path in removed:
        say(f"removed {path}")
    say(f"removed {len(removed)} leftover folder(s), freed {_mib(freed)}" if removed
        else "no leftovers to remove")
    if args.json:
        print_json({"removed": [str(p) for p in removed], "freed_bytes": freed})
    return 0


def cmd_completion(args: argparse.Namespace) -> int:
    """Print the shell's completion script (argcomplete: the shell asks `appliance` itself, so
    artifact names come from the workspace)."""
    try:
        import argcomplete
    except ImportError:
        raise ApplianceError("argcomplete is not installed in this environment",
                             title="Missing package", hint="re-run `make setup`") from None
    sys.stdout.write(argcomplete.shellcode(["appliance"], shell=args.shell))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from appliance import demo

    return demo.run(_workspace(args), say)


def cmd_tui(args: argparse.Namespace) -> int:
    from tui.app import run

    return run(_workspace(args))


# -- completion of names -----------------------------------------------------------------------
def _home(parsed: argparse.Namespace) -> Path:
    from appliance.workspace import default_home

    home = getattr(parsed, "home", None)
    return (Path(home) if home else default_home()).expanduser()


def _names(kind: str) -> Callable[..., list[str]]:
    """An argcomplete completer: the names of a kind's artifacts, read from the workspace folders
    (no database, nothing written: it runs on every Tab)."""
    def complete(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
        from appliance.workspace import KIND_DIRS

        folder = _home(parsed_args) / KIND_DIRS[kind]
        try:
            return sorted(p.name for p in folder.iterdir() if p.name.startswith(prefix)
                          and not p.name.startswith(".") and (p / "manifest.json").is_file())
        except OSError:
            return []

    return complete


def _job_ids(prefix: str, parsed_args: argparse.Namespace, **_: Any) -> list[str]:
    try:
        return sorted((p.name for p in (_home(parsed_args) / "jobs").iterdir()
                       if p.name.startswith(prefix) and p.is_dir()), reverse=True)
    except OSError:
        return []


def _complete(action: argparse.Action, completer: Callable[..., list[str]]) -> argparse.Action:
    action.completer = completer  # type: ignore[attr-defined]  # read by argcomplete
    return action


# -- the parser --------------------------------------------------------------------------------
def _json_flag(p: argparse.ArgumentParser, what: str = "the result") -> None:
    p.add_argument("--json", action="store_true",
                   help=f"print {what} as JSON on stdout (progress goes to stderr)")


def _add_list(sub: Any, help_text: str, func: Callable[[argparse.Namespace], int]) -> None:
    p = sub.add_parser("list", help=help_text)
    _json_flag(p, "the list")
    p.set_defaults(func=func)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="appliance",
        description="Offline LLM adaptation and deployment. Run with no command for the TUI.",
        epilog="Exit codes: 0 ok, 1 a check said no, 2 usage, 3 network blocked, 4 not found, "
               "5 invalid input, 6 parity gate failed, 7 job failed, 8 busy, 9 disk full, "
               "130 interrupted, 141 output pipe closed.")
    parser.add_argument("--version", action="version", version=f"appliance {__version__}")
    parser.add_argument("--home", help="workspace directory (default: $APPLIANCE_HOME or "
                                       "~/.local/share/appliance)")
    parser.set_defaults(func=cmd_tui)
    sub = parser.add_subparsers(title="commands", metavar="COMMAND")
    _models_parser(sub)
    _data_parser(sub)
    _train_parser(sub)
    _export_parser(sub)
    _jobs_parser(sub)

    p = sub.add_parser("doctor", help="check the installation, hardware and offline status")
    p.add_argument("--json", action="store_true")
    p.add_argument("--clean", action="store_true",
                   help="remove hidden staging folders that killed imports and exports left behind")
    p.add_argument("--yes", action="store_true", help="with --clean: do not ask for confirmation")
    p.set_defaults(func=cmd_doctor)
    sub.add_parser("demo", help="run the pipeline on the embedded default model").set_defaults(
        func=cmd_demo)
    sub.add_parser("tui", help="open the terminal UI (the default)").set_defaults(func=cmd_tui)
    p = sub.add_parser("completion", help="print the shell completion script (bash, zsh, fish)",
                       description="bash: eval \"$(appliance completion bash)\" in ~/.bashrc; "
                                   "zsh: eval \"$(appliance completion zsh)\" in ~/.zshrc after "
                                   "compinit; fish: appliance completion fish > "
                                   "~/.config/fish/completions/appliance.fish")
    p.add_argument("shell", choices=SHELLS)
    p.set_defaults(func=cmd_completion)
    for module in COMMAND_MODULES:
        importlib.import_module(module).register(sub)
    _complete_registered(sub)
    return parser


def _models_parser(sub: Any) -> None:
    models = sub.add_parser("models", help="import, list, show and remove base models")
    msub = models.add_subparsers(metavar="ACTION", required=True)
    p = msub.add_parser("import", help="import an HF folder (safetensors), a .gguf file, or "
                                       "--default (the embedded SmolLM2-135M-Instruct)")
    p.add_argument("path", nargs="?")
    p.add_argument("--default", action="store_true")
    p.add_argument("--name")
    p.add_argument("--chat-template", metavar="FILE", help="Jinja chat template to use")
    p.add_argument("--detach", action="store_true", help="run as a background job")
    _json_flag(p, "the imported model")
    p.set_defaults(func=cmd_models_import)
    _add_list(msub, "list models", cmd_models_list)
    _add_show(msub, cmd_models_show, "model")
    _add_rm(msub, "model")


def _data_parser(sub: Any) -> None:
    data = sub.add_parser("data", help="import, list and show datasets")
    dsub = data.add_subparsers(metavar="ACTION", required=True)
    p = dsub.add_parser("import", help="import a JSONL dataset for a model")
    p.add_argument("file")
    _complete(p.add_argument("--model", required=True, help="model whose tokenizer and template to use"),
              _names("model"))
    p.add_argument("--name")
    p.add_argument("--format", default="auto",
                   choices=["auto", "messages", "sharegpt", "alpaca", "dolly"])
    p.add_argument("--eval-fraction", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, help="reject longer conversations "
                                                  "(default: the model's context length)")
    _json_flag(p, "the dataset and its import report")
    p.set_defaults(func=cmd_data_import)
    _add_list(dsub, "list datasets", cmd_data_list)
    show = _add_show(dsub, cmd_data_show, "dataset")
    show.add_argument("--rejections", type=int, default=20, metavar="N",
                      help="how many rejected lines to print")
    _add_rm(dsub, "dataset")


def _train_parser(sub: Any) -> None:
    p = sub.add_parser("train", help="QLoRA-train a model on a dataset (a background job)")
    _complete(p.add_argument("--model", required=True), _names("model"))
    _complete(p.add_argument("--dataset", required=True), _names("dataset"))
    p.add_argument("--recipe", default="smollm2-cpu", help="shipped recipe name or a .toml file")
    p.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a recipe key")
    p.add_argument("--name", help="name of the run artifact (default MODEL-DATASET)")
    p.add_argument("--follow", "-f", action="store_true", help="show progress until it ends")
    p.add_argument("--target", help="plan memory for this GPU (default: the one found here)")
    p.add_argument("--force", action="store_true", help="start even if the plan says it won't fit")
    _json_flag(p, "the job (and with --follow, how it ended and the run)")
    p.set_defaults(func=cmd_train)

    runs = sub.add_parser("runs", help="list, show and remove finished training runs")
    rsub = runs.add_subparsers(metavar="ACTION", required=True)
    _add_list(rsub, "list runs", cmd_runs_list)
    _add_show(rsub, cmd_runs_show, "run")
    _add_rm(rsub, "run")

    p = sub.add_parser("plan", help="will a training config fit in GPU memory? what would?")
    _complete(p.add_argument("--model", required=True), _names("model"))
    p.add_argument("--recipe", default="smollm2-cpu")
    p.add_argument("--set", action="append", metavar="KEY=VALUE")
    p.add_argument("--target", help="a GPU: t4-16gb, l4-24gb, a10-24gb, a100-40gb, a100-80gb, "
                                    "h100-80gb (default: the one found here)")
    _json_flag(p, "the plan")
    p.set_defaults(func=cmd_plan)


def _export_parser(sub: Any) -> None:
    p = sub.add_parser("merge", help="merge a run's adapter into a full-precision copy of its base")
    _complete(p.add_argument("run"), _names("run"))
    p.add_argument("--dtype", choices=("auto", "fp32", "fp16", "bf16"), default="auto")
    p.add_argument("--base", choices=("full", "nf4"), default="full",
                   help="full: the base as imported; nf4: the base as training saw it (NF4 round trip)")
    p.add_argument("--detach", action="store_true", help="start the job and return")
    _json_flag(p)
    p.set_defaults(func=cmd_merge)
    exp = sub.add_parser("export", help="export a run to GGUF or ONNX (merges first; parity-checked)")
    esub = exp.add_subparsers(dest="format", metavar="FORMAT", required=True)
    from appliance.stages.export import DEFAULT_TYPES, GGUF_OFFERED, ONNX_PRECISIONS

    for fmt, option, default, text in (
            ("gguf", "--quant", ",".join(DEFAULT_TYPES["gguf"]), "llama.cpp types, comma-separated "
             f"({', '.join(GGUF_OFFERED)}, ...)"),
            ("onnx", "--precision", ",".join(DEFAULT_TYPES["onnx"]),
             f"comma-separated: {', '.join(ONNX_PRECISIONS)} (fp16 on CUDA)")):
        p = esub.add_parser(fmt, help=f"export to {fmt.upper()}")
        _complete(p.add_argument("run"), _names("run"))
        p.add_argument(option, default=default, help=text)
        p.add_argument("--threshold", action="append", metavar="KEY=VALUE",
                       help="override a parity threshold: ppl_increase, kl or agreement")
        p.add_argument("--detach", action="store_true", help="start the job and return")
        _json_flag(p, "the exports and their parity reports")
        p.set_defaults(func=cmd_export)
    p = sub.add_parser("verify", help="run the parity gate of an export again")
    _complete(p.add_argument("export"), _names("export"))
    p.add_argument("--threshold", action="append", metavar="KEY=VALUE")
    p.add_argument("--detach", action="store_true")
    _json_flag(p, "the verdict and the parity report")
    p.set_defaults(func=cmd_verify)
    exs = sub.add_parser("exports", help="list, show and remove exports")
    xsub = exs.add_subparsers(metavar="ACTION", required=True)
    _add_list(xsub, "list exports with their parity verdicts", cmd_exports_list)
    _add_show(xsub, cmd_exports_show, "export")
    _add_rm(xsub, "export")


def _jobs_parser(sub: Any) -> None:
    jobs = sub.add_parser("jobs", help="list, follow, cancel and resume background jobs")
    jsub = jobs.add_subparsers(metavar="ACTION", required=True)
    _add_list(jsub, "all jobs", cmd_jobs_list)
    for action, text in (("show", "a job's record"), ("logs", "a job's events"),
                         ("cancel", "ask a job to stop (it saves its state first)"),
                         ("resume", "continue an interrupted, failed or cancelled job"),
                         ("run", "run a queued job in this process (used by spawn and systemd)")):
        p = jsub.add_parser(action, help=text)
        _complete(p.add_argument("id"), _job_ids)
        if action == "logs":
            p.add_argument("--follow", "-f", action="store_true")
        if action == "show":  # it always prints JSON; accepted so scripts can pass --json everywhere
            p.add_argument("--json", action="store_true", help=argparse.SUPPRESS)
        funcs = {"show": cmd_jobs_show, "logs": cmd_jobs_logs}
        p.set_defaults(func=funcs.get(action, lambda a, act=action: cmd_jobs_action(a, act)))
    p = jsub.add_parser("worker")  # one rank of a data-parallel job, started by torchrun
    p.add_argument("id")
    p.set_defaults(func=cmd_jobs_worker)
    p = jsub.add_parser("selftest", help="a small detached job to check jobs work on this box")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--interval", type=float, default=0.5)
    p.set_defaults(func=cmd_jobs_selftest)


def _complete_registered(sub: Any) -> None:
    """Export names for the commands other modules register (`chat ARTIFACT`, `serve ARTIFACT...`)."""
    for command in ("chat", "serve"):
        for action in getattr(sub.choices.get(command), "_actions", []):
            if action.dest in ("artifact", "artifacts"):
                _complete(action, _names("export"))


def _add_show(sub: Any, func: Callable[[argparse.Namespace], int], kind: str) -> argparse.ArgumentParser:
    p = sub.add_parser("show", help="details, checked against the manifest")
    _complete(p.add_argument("name"), _names(kind))
    p.add_argument("--verify", action="store_true", help="recompute every file's sha256")
    p.add_argument("--json", action="store_true", help="print the manifest")
    p.set_defaults(func=func)
    return p


def _add_rm(sub: Any, kind: str) -> None:
    p = sub.add_parser("rm", help=f"remove a {kind}")
    _complete(p.add_argument("name"), _names(kind))
    p.add_argument("--yes", action="store_true", help="do not ask for confirmation")
    p.set_defaults(func=lambda args: cmd_rm(args, kind))


# -- running a command ---------------------------------------------------------------------------
def _is_closed(stream: Any) -> bool:
    """True when `stream` is a pipe or socket whose reader has gone away (poll reports an error)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):
        return False  # not a real file (a test's capture): not a closed pipe
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & (select.POLLERR | select.POLLHUP) for _, events in poller.poll(0))


def _closed_pipe() -> bool:
    """After a BrokenPipeError: if stdout or stderr is a closed pipe, point it at /dev/null (so the
    interpreter's last flush is quiet) and say so; False when the broken pipe was something else."""
    closed = [s for s in (sys.stdout, sys.stderr) if _is_closed(s)]
    if closed:
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in closed:
            os.dup2(devnull, stream.fileno())
        os.close(devnull)
    return bool(closed)


def run_command(args: argparse.Namespace) -> int:
    """Run a parsed command: each `ApplianceError` exits with its class's code, without a
    traceback; `--json` sends the human text to stderr."""
    HumanOutput.to_stderr = bool(getattr(args, "json", False))
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at interpreter exit
        return code
    except ApplianceError as exc:
        print(f"error: {exc.title}: {exc}", file=sys.stderr)
        return int(exc.exit_code)
    except offline.NetworkBlockedError as exc:
        print(f"error: {exc.title}: {exc}", file=sys.stderr)
        return int(ExitCode.NETWORK_BLOCKED)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return int(ExitCode.INTERRUPTED)
    finally:
        HumanOutput.to_stderr = False


def quiet_on_closed_pipe(func: Callable[[], int]) -> int:
    """Run `func`; a reader that closed the pipe early (`appliance ... | head`) ends it quietly with
    141 instead of a BrokenPipeError traceback."""
    try:
        try:
            result = func()
        except SystemExit:
            sys.stdout.flush()  # argparse's --help and usage, written before it exits
            raise
        sys.stdout.flush()  # not in a `finally`: a flush error must not mask a real exception
        return result
    except BrokenPipeError:
        if not _closed_pipe():
            raise  # a pipe to something else broke: a bug, keep the traceback
        return BROKEN_PIPE


def main(argv: Sequence[str] | None = None) -> int:
    offline.install()

    def run() -> int:
        parser = build_parser()
        if "_ARGCOMPLETE" in os.environ:  # the shell asks for completions (`appliance completion`)
            import argcomplete

            argcomplete.autocomplete(parser)  # prints them and exits
        return run_command(parser.parse_args(argv))

    return quiet_on_closed_pipe(run)


if __name__ == "__main__":
    raise SystemExit(main())
