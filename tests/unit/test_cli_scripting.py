"""The `appliance` command as scripts use it: quiet on a closed pipe, `--json` on every list and
result, an exit code per kind of failure, the parity verdict after `verify`, `doctor --clean` and
shell completion.

Artifacts here are real workspace artifacts (written through `Workspace.writer`, so manifests and the
index are the real ones) with made-up contents; jobs are faked only where a test needs a job to
end a given way (the real jobs are in tests/integration/test_cli_json.py)."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from appliance import cli, jobs, offline
from appliance.cli import doctor as doctor_commands
from appliance.cli import train as train_commands
from appliance.errors import BusyError, DiskFullError, ExitCode, NotFoundError
from appliance.workspace import Workspace

ROOT = Path(__file__).resolve().parents[2]


def _env(home: Path) -> dict[str, str]:
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    return {**os.environ, "PYTHONPATH": path, "APPLIANCE_HOME": str(home)}


def appliance(*args: str, home: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "appliance", *args], capture_output=True, text=True,
                          env=_env(home), timeout=120)


def make_artifact(ws: Workspace, kind: str, name: str, *, summary: dict[str, Any],
                  config: dict[str, Any] | None = None, files: dict[str, str] | None = None,
                  status: str = "ready") -> Any:
    with ws.writer(kind, name) as w:
        for rel, text in (files or {"data.txt": "x"}).items():
            (w.path / rel).parent.mkdir(parents=True, exist_ok=True)
            (w.path / rel).write_text(text)
        w.commit(config=config or {}, info={"summary": summary}, status=status)
    return ws.get(kind, name)


REPORT = {"form": "alpaca", "lines": 3, "kept": 2, "train": 1, "eval": 1, "rejected": 1,
          "duplicates": 0, "tokens": {}, "rejected_by_reason": {"bad_json": 1},
          "rejections": [{"line": 3, "reason": "bad JSON"}], "duplicate_lines": []}


def make_dataset(ws: Workspace, name: str = "chats", extra_files: int = 0) -> Any:
    files = {"report.json": json.dumps(REPORT), "train.jsonl": "{}\n", "eval.jsonl": "{}\n"}
    files.update({f"extra/{i:05}.txt": str(i) for i in range(extra_files)})
    return make_artifact(ws, "dataset", name, files=files,
                         config={"source": {"path": "/data/chats.jsonl"}},
                         summary={"model": "m", "form": "alpaca", "train": 1, "eval": 1,
                                  "rejected": 1, "duplicates": 0})


PARITY_ROW = {"name": "r-gguf-q8_0", "kind": "q8_0", "perplexity": 3.5, "ppl_increase": 0.05,
              "kl": 0.01, "agreement": 0.95, "tokens_identical": True,
              "threshold": {"ppl_increase": 0.02, "kl": 0.02, "agreement": 0.9}, "passed": False,
              "reasons": ["perplexity +5.00% > +2.00%"]}


def parity_report(passed: bool) -> dict[str, Any]:
    row = {**PARITY_ROW, "passed": passed, "reasons": [] if passed else PARITY_ROW["reasons"]}
    return {"conversations": 8, "tokens": 300, "reference": {"name": "r-merged", "perplexity": 3.3},
            "artifacts": [row], "passed": passed}


def make_export(ws: Workspace, passed: bool, name: str = "r-gguf-q8_0") -> Any:
    return make_artifact(ws, "export", name, files={"parity.json": json.dumps(parity_report(passed))},
                         config={"format": "gguf", "type": "Q8_0", "run": "r"},
                         summary={"format": "gguf", "type": "Q8_0", "run": "r",
                                  "parity": "pass" if passed else "FAIL"},
                         status="ready" if passed else "failed")


# -- a closed pipe ---------------------------------------------------------------------------------
def _no_traceback(stderr: str) -> None:
    for text in ("Traceback", "BrokenPipeError", "Exception ignored"):
        assert text not in stderr, stderr


def test_a_reader_that_closed_first_gets_no_traceback(tmp_path: Path) -> None:
    """`appliance data show NAME --json | head -1`, made deterministic: the pipe's read end is
    closed before the command starts, so its first write meets a closed pipe."""
    make_dataset(Workspace(tmp_path / "ws"))
    read, write = os.pipe()
    os.close(read)
    try:
        proc = subprocess.run([sys.executable, "-m", "appliance", "data", "show", "chats", "--json"],
                              stdout=write, stderr=subprocess.PIPE, text=True,
                              env=_env(tmp_path / "ws"), timeout=120)
    finally:
        os.close(write)
    _no_traceback(proc.stderr)
    assert proc.returncode == cli.BROKEN_PIPE


@pytest.mark.parametrize("command", [["data", "show", "big", "--json"], ["jobs", "logs", "JOB"],
                                     ["jobs", "logs", "JOB", "--follow"]])
def test_head_closing_the_pipe_ends_the_command_quietly(tmp_path: Path, command: list[str]) -> None:
    """Through a real shell pipeline into `head -1`, with output far larger than a pipe holds.
    The followed job is still queued, so without the fix `--follow` would print a traceback."""
    ws = Workspace(tmp_path / "ws")
    make_dataset(ws, "big", extra_files=2000)
    job = jobs.submit(ws, "selftest", {"steps": 1})
    for i in range(3000):
        jobs.append_event(jobs.job_dir(ws, job.id), {"type": "log", "message": f"line {i} " + "x" * 40})
    args = " ".join(job.id if a == "JOB" else a for a in command)
    script = f'"$PY" -m appliance {args} | head -1; echo "rc=${{PIPESTATUS[0]}}" >&2'
    proc = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120,
                          env={**_env(ws.root), "PY": sys.executable})
    _no_traceback(proc.stderr)
    assert len(proc.stdout.splitlines()) == 1
    assert f"rc={cli.BROKEN_PIPE}" in proc.stderr


def test_a_broken_pipe_that_is_not_stdout_keeps_its_traceback(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a closed stdout/stderr is quiet: a BrokenPipeError from anything else is a bug."""
    def broken(args: Any) -> int:
        raise BrokenPipeError("a pipe to a child process")

    monkeypatch.setattr(doctor_commands, "cmd_doctor", broken)
    with pytest.raises(BrokenPipeError, match="child process"):
        cli.main(["--home", str(tmp_path), "doctor"])


# -- --json ----------------------------------------------------------------------------------------
def test_every_list_has_json(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    make_artifact(ws, "model", "m", summary={"architecture": "LlamaForCausalLM", "parameters": 135000000,
                                             "context_length": 2048, "dtype": "bfloat16"})
    make_dataset(ws)
    make_artifact(ws, "run", "r", summary={"model": "m", "dataset": "chats", "steps": 4,
                                           "perplexity_before": 9.5, "perplexity_after": 8.25})
    make_export(ws, passed=True)
    job = jobs.submit(ws, "selftest", {"steps": 1})
    expected = {
        "models": {"name": "m", "status": "ready", "architecture": "LlamaForCausalLM",
                   "parameters": 135000000, "context_length": 2048, "dtype": "bfloat16"},
        "data": {"name": "chats", "model": "m", "form": "alpaca", "train": 1, "eval": 1,
                 "rejected": 1, "duplicates": 0},
        "runs": {"name": "r", "model": "m", "dataset": "chats", "steps": 4,
                 "perplexity_before": 9.5, "perplexity_after": 8.25},
        "exports": {"name": "r-gguf-q8_0", "status": "ready", "format": "gguf", "type": "Q8_0",
                    "run": "r", "parity": "pass"},
    }
    for group, keys in expected.items():
        out = appliance(group, "list", "--json", home=ws.root)
        assert out.returncode == 0, out.stderr
        (row,) = json.loads(out.stdout)
        assert {k: row[k] for k in keys} == keys
        assert row["path"].startswith(str(ws.root)) and row["created"]
    out = appliance("jobs", "list", "--json", home=ws.root)
    (row,) = json.loads(out.stdout)
    assert (row["id"], row["kind"], row["state"]) == (job.id, "selftest", "queued")


def test_an_empty_list_is_an_empty_json_array(tmp_path: Path) -> None:
    for group in ("models", "data", "runs", "exports", "jobs"):
        out = appliance(group, "list", "--json", home=tmp_path / "none")
        assert (out.returncode, json.loads(out.stdout)) == (0, []), out.stderr


class FakeJobs:
    """jobs.start/follow/get for a job that ends in `state` with `result`, without a process."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, state: str, result: dict[str, Any],
                 params: dict[str, Any] | None = None) -> None:
        self.job = jobs.Job(id="20260101-000000-x-abc123", kind="x", params=params or {},
                            state="queued", created="now", started=None, finished=None, pid=None,
                            pid_start=None, attempt=1, message="", result={})
        self.end = {"state": state, "result": result, "message": "done" if state == "succeeded"
                    else f"it ended {state}"}
        monkeypatch.setattr(jobs, "start", self.start)
        monkeypatch.setattr(jobs, "follow", self.follow)
        monkeypatch.setattr(jobs, "get", self.get)
        self.started: list[tuple[str, dict[str, Any]]] = []

    def start(self, ws: Any, kind: str, params: dict[str, Any]) -> jobs.Job:
        self.started.append((kind, params))
        self.job = dataclasses.replace(self.job, kind=kind, params=params)
        return self.job

    def follow(self, ws: Any, job_id: str) -> Any:
        yield {"type": "log", "message": "working"}
        yield {"type": "state", "state": self.end["state"]}

    def get(self, ws: Any, job_id: str) -> jobs.Job:
        return dataclasses.replace(self.job, **self.end)


def test_verify_prints_the_table_and_the_verdict(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ws = Workspace(tmp_path / "ws")
    make_export(ws, passed=False)
    FakeJobs(monkeypatch, "succeeded", {"passed": False})
    assert cli.main(["--home", str(ws.root), "verify", "r-gguf-q8_0"]) == ExitCode.PARITY_FAILED
    out = capsys.readouterr().out
    assert "r-gguf-q8_0" in out and "perplexity +5.00% > +2.00%" in out  # the table
    verdict = out.strip().splitlines()[-1]
    assert "FAILED" in verdict and "+2.00%" in verdict and "0.02" in verdict and "90" in verdict

    make_export(ws, passed=True, name="r-gguf-q4")
    FakeJobs(monkeypatch, "succeeded", {"passed": True})
    assert cli.main(["--home", str(ws.root), "verify", "r-gguf-q4"]) == 0
    assert "PASSED" in capsys.readouterr().out.strip().splitlines()[-1]
    assert cli.main(["--home", str(ws.root), "exports", "show", "r-gguf-q8_0"]) == 0
    assert "FAILED" in capsys.readouterr().out  # the same verdict as `exports show`


def test_verify_json_is_the_only_thing_on_stdout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                 capsys: pytest.CaptureFixture[str]) -> None:
    ws = Workspace(tmp_path / "ws")
    make_export(ws, passed=False)
    FakeJobs(monkeypatch, "succeeded", {"passed": False})
    code = cli.main(["--home", str(ws.root), "verify", "r-gguf-q8_0", "--json"])
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert code == ExitCode.PARITY_FAILED
    assert doc["passed"] is False and doc["export"]["name"] == "r-gguf-q8_0"
    assert doc["job"]["state"] == "succeeded" and doc["parity"]["artifacts"][0]["reasons"]
    assert "started" in err and "FAILED" in err  # progress and the verdict went to stderr


def test_export_and_merge_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                               capsys: pytest.CaptureFixture[str]) -> None:
    ws = Workspace(tmp_path / "ws")
    make_artifact(ws, "run", "r", summary={})  # export refuses a run that is not there, before a job
    make_export(ws, passed=True)
    make_export(ws, passed=False, name="r-gguf-q2_k")
    FakeJobs(monkeypatch, "succeeded", {"exports": {"r-gguf-q8_0": "ready", "r-gguf-q2_k": "failed"}})
    code = cli.main(["--home", str(ws.root), "export", "gguf", "r", "--quant", "Q8_0,Q2_K", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == ExitCode.PARITY_FAILED and doc["passed"] is False
    assert {(e["name"], e["status"]) for e in doc["exports"]} == {("r-gguf-q8_0", "ready"),
                                                                  ("r-gguf-q2_k", "failed")}
    assert all(e["parity"]["artifacts"] for e in doc["exports"])

    make_artifact(ws, "export", "r-merged", summary={"format": "merged", "run": "r"},
                  config={"format": "hf", "run": "r"})
    FakeJobs(monkeypatch, "succeeded", {"export": "r-merged", "path": "x"})
    assert cli.main(["--home", str(ws.root), "merge", "r", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["export"]["name"] == "r-merged" and doc["job"]["kind"] == "merge"


def test_detached_jobs_print_the_job_as_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    fake = FakeJobs(monkeypatch, "succeeded", {})
    assert cli.main(["--home", str(tmp_path), "merge", "r", "--detach", "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["job"]["id"] == fake.job.id and doc["job"]["state"] == "queued"


def _train_params(ws: Workspace, args: Any) -> dict[str, Any]:
    """What `train` queues, without reading a recipe or planning memory."""
    return {"name": "m-d", "model": "m", "dataset": "d"}


def test_train_follow_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                           capsys: pytest.CaptureFixture[str]) -> None:
    ws = Workspace(tmp_path / "ws")
    make_artifact(ws, "run", "m-d", summary={"model": "m", "dataset": "d", "steps": 2})
    monkeypatch.setattr(train_commands, "train_params", _train_params)
    FakeJobs(monkeypatch, "succeeded", {"run": "m-d"}, params={"name": "m-d"})
    assert cli.main(["--home", str(ws.root), "train", "--model", "m", "--dataset", "d", "-f",
                     "--json"]) == 0
    out, err = capsys.readouterr()
    doc = json.loads(out)
    assert doc["job"]["state"] == "succeeded" and doc["run"]["name"] == "m-d" and doc["run"]["steps"] == 2
    assert "working" in err


def test_plan_json(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                   capsys: pytest.CaptureFixture[str]) -> None:
    from appliance.stages.train import config as trainconfig
    from appliance.stages.train import planner

    ws = Workspace(tmp_path / "ws")
    make_artifact(ws, "model", "m", summary={"context_length": 2048})
    cfg = trainconfig.validate(trainconfig.load_recipe("smollm2-cpu")[0], source="t",
                               context_length=2048)
    shape = planner.Shape(vocab=49152, hidden=576, intermediate=1536, layers=30, heads=9,
                          kv_heads=3, head_dim=64, tied=True)
    monkeypatch.setattr(planner, "model_shape", lambda path: shape)
    code = cli.main(["--home", str(ws.root), "plan", "--model", "m", "--target", "t4-16gb", "--json"])
    doc = json.loads(capsys.readouterr().out)
    assert code == 0 and doc["fits"] is True and doc["target"]["name"] == "NVIDIA T4 16GB"
    assert doc["batch_size"] == cfg.batch_size and doc["estimate_gib"]["total"] > 0
    assert doc["proposal"] is None


# -- exit codes ------------------------------------------------------------------------------------
def test_exit_codes_through_the_command(tmp_path: Path) -> None:
    home = tmp_path / "ws"
    missing = appliance("models", "show", "nope", home=home)
    assert missing.returncode == ExitCode.NOT_FOUND and "error: Not found:" in missing.stderr
    usage = appliance("models", "import", home=home)  # neither PATH nor --default
    assert usage.returncode == ExitCode.USAGE and "--default" in usage.stderr
    assert appliance("models", "frobnicate", home=home).returncode == ExitCode.USAGE  # argparse
    invalid = appliance("verify", "x", "--threshold", "speed=3", home=home)
    assert invalid.returncode == ExitCode.INVALID and "--threshold 'speed=3'" in invalid.stderr
    assert appliance("jobs", "show", "nope", home=home).returncode == ExitCode.NOT_FOUND


def _raising(exc: BaseException) -> Any:
    def command(args: Any) -> int:
        raise exc
    return command


@pytest.mark.parametrize(("exc", "code"), [
    (offline.NetworkBlockedError("connect to 10.0.0.1:443 blocked"), ExitCode.NETWORK_BLOCKED),
    (NotFoundError("no such thing"), ExitCode.NOT_FOUND),
    (BusyError("held by pid 1"), ExitCode.BUSY),
    (DiskFullError("disk full at /x: free 0 MB"), ExitCode.DISK_FULL),
    (KeyboardInterrupt(), ExitCode.INTERRUPTED),
])
def test_each_failure_has_its_exit_code(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture[str], exc: BaseException,
                                        code: int) -> None:
    monkeypatch.setattr(doctor_commands, "cmd_doctor", _raising(exc))
    assert cli.main(["--home", str(tmp_path), "doctor"]) == code
    assert "Traceback" not in capsys.readouterr().err


@pytest.mark.parametrize("state", ["failed", "cancelled", "interrupted"])
def test_a_followed_job_that_did_not_succeed_exits_7(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                     state: str) -> None:
    FakeJobs(monkeypatch, state, {})
    assert cli.main(["--home", str(tmp_path), "merge", "r"]) == ExitCode.JOB_FAILED
    monkeypatch.setattr(train_commands, "train_params", _train_params)
    assert cli.main(["--home", str(tmp_path), "train", "--model", "m", "--dataset", "d",
                     "--follow"]) == ExitCode.JOB_FAILED


def test_a_parity_gate_failure_exits_6_not_2(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    ws = Workspace(tmp_path / "ws")
    make_artifact(ws, "run", "r", summary={})
    make_export(ws, passed=False, name="r-gguf-q2_k")
    FakeJobs(monkeypatch, "succeeded", {"exports": {"r-gguf-q2_k": "failed"}})
    assert cli.main(["--home", str(ws.root), "export", "gguf", "r", "--quant", "Q2_K"]) == 6


# -- doctor --clean --------------------------------------------------------------------------------
def _leftover(ws: Workspace, kind_dir: str, name: str, size: int) -> Path:
    path = ws.root / kind_dir / f".staging-{name}-4242-0123abcd"
    path.mkdir(parents=True)
    (path / "model.safetensors").write_bytes(b"\0" * size)
    return path


def _needs_remove_leftovers() -> None:
    from appliance import doctor

    if not hasattr(doctor, "remove_leftovers"):
        pytest.skip("appliance.doctor.remove_leftovers(ws) -> list[Path] is not written yet "
                    "(another engineer's part of issue 12)")


def test_doctor_clean_lists_asks_and_reports_what_the_remover_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """The command's side, with a stand-in for `doctor.remove_leftovers` (which decides what is
    really left over): it lists the staging folders with their sizes, removes nothing when the
    answer is no, and counts only what the remover says it removed."""
    from appliance import doctor

    ws = Workspace(tmp_path / "ws").ensure()
    one = _leftover(ws, "models", "smol", 2 * 2**20)
    two = _leftover(ws, "exports", "e", 2**20)
    calls: list[Any] = []

    def remover(w: Workspace) -> list[Path]:
        calls.append(w.root)
        shutil.rmtree(one)
        return [one]  # `two` is still held by a live writer, say

    monkeypatch.setattr(doctor, "remove_leftovers", remover, raising=False)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda *prompt: "no")
    assert cli.main(["--home", str(ws.root), "doctor", "--clean"]) == ExitCode.FAILED
    assert calls == [] and one.exists() and two.exists()
    out = capsys.readouterr().out
    assert str(one) in out and "2.0 MiB" in out and str(two) in out

    monkeypatch.setattr("builtins.input", lambda *prompt: "y")
    assert cli.main(["--home", str(ws.root), "doctor", "--clean", "--json"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out) == {"removed": [str(one)], "freed_bytes": 2 * 2**20}
    assert "freed 2.0 MiB" in err and calls == [ws.root]
    assert "remove 2 leftover folder(s), 3.0 MiB? [y/N]" in err  # the question too: stdout is JSON


def test_doctor_clean_removes_leftovers_and_says_how_much(tmp_path: Path) -> None:
    _needs_remove_leftovers()
    ws = Workspace(tmp_path / "ws").ensure()
    staged = _leftover(ws, "models", "smol", 3 * 2**20)
    out = appliance("doctor", "--clean", "--yes", home=ws.root)
    assert out.returncode == 0, out.stderr
    assert not staged.exists() and staged.name in out.stdout and "3.0 MiB" in out.stdout
    doc = json.loads(appliance("doctor", "--clean", "--yes", "--json", home=ws.root).stdout)
    assert doc == {"removed": [], "freed_bytes": 0}


def test_doctor_clean_asks_first(tmp_path: Path) -> None:
    _needs_remove_leftovers()
    ws = Workspace(tmp_path / "ws").ensure()
    staged = _leftover(ws, "datasets", "d", 1000)
    refused = appliance("doctor", "--clean", home=ws.root)  # no terminal to ask on, no --yes
    assert refused.returncode == ExitCode.USAGE and "--yes" in refused.stderr
    assert staged.exists()


def test_doctor_clean_answer_no_keeps_them(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _needs_remove_leftovers()
    ws = Workspace(tmp_path / "ws").ensure()
    staged = _leftover(ws, "models", "m", 10)
    monkeypatch.setattr(sys.stdin, "isatty", lambda: True, raising=False)
    monkeypatch.setattr("builtins.input", lambda *prompt: "n")
    assert cli.main(["--home", str(ws.root), "doctor", "--clean"]) == ExitCode.FAILED
    assert staged.exists()


# -- completion ------------------------------------------------------------------------------------
@pytest.mark.parametrize(("shell", "marker"), [("bash", "complete "), ("zsh", "#compdef appliance"),
                                               ("fish", "complete --command appliance")])
def test_completion_prints_a_script_per_shell(tmp_path: Path, shell: str, marker: str) -> None:
    out = appliance("completion", shell, home=tmp_path)
    assert out.returncode == 0, out.stderr
    assert marker in out.stdout and "appliance" in out.stdout


def _bash_complete(line: str, home: Path, tmp_path: Path) -> list[str]:
    """What bash offers for `line` (cursor at the end), through the script `completion bash`
    prints, with `appliance` on PATH as a real command."""
    bindir = tmp_path / "bin"
    bindir.mkdir(exist_ok=True)
    exe = bindir / "appliance"
    exe.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m appliance "$@"\n')
    exe.chmod(0o755)
    script = appliance("completion", "bash", home=home).stdout
    words = line.split(" ")
    driver = (f"{script}\nCOMP_LINE={json.dumps(line)}; COMP_POINT={len(line)}\n"
              f"COMP_WORDS=({' '.join(json.dumps(w) for w in words)}); COMP_CWORD={len(words) - 1}\n"
              "_python_argcomplete appliance\nprintf '%s\\n' \"${COMPREPLY[@]}\"\n")
    env = {**_env(home), "PATH": f"{bindir}{os.pathsep}{os.environ['PATH']}"}
    out = subprocess.run(["bash", "-c", driver], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    return [w.strip() for w in out.stdout.splitlines() if w.strip()]


@pytest.mark.skipif(shutil.which("bash") is None, reason="bash is not installed")
def test_bash_completes_commands_and_artifact_names(tmp_path: Path) -> None:
    ws = Workspace(tmp_path / "ws")
    make_artifact(ws, "model", "smol", summary={})
    make_artifact(ws, "model", "qwen", summary={})
    make_export(ws, passed=True)
    assert "models" in _bash_complete("appliance mo", ws.root, tmp_path)
    assert set(_bash_complete("appliance models ", ws.root, tmp_path)) >= {"import", "list", "show", "rm"}
    assert _bash_complete("appliance models show s", ws.root, tmp_path) == ["smol"]
    assert _bash_complete("appliance verify r-g", ws.root, tmp_path) == ["r-gguf-q8_0"]


def test_the_demo_exits_7_when_a_job_it_follows_fails(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    from appliance import demo
    from appliance.errors import JobFailedError

    FakeJobs(monkeypatch, "failed", {})
    with pytest.raises(JobFailedError, match="export job ended failed") as caught:
        demo._follow_job(Workspace(tmp_path / "ws"), "export",
                         {"run": "r", "format": "onnx", "types": ["int4"]}, say=lambda _: None)
    assert caught.value.exit_code == ExitCode.JOB_FAILED
