"""The `selftest` job: no stage, a counter that lets an operator (and the tests) check detaching,
cancel, kill and resume on this box."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from typing import Any

from appliance.jobs import JobContext


def run(ctx: JobContext) -> dict[str, Any]:
    """Counts to `steps`, one step per `interval` seconds, keeping its position in a checkpoint:
    lets an operator (and the tests) check detaching, cancel, kill and resume on this box.

    `load` seconds first stand for a phase that never checks for a cancel (a model load), spent
    in this process or, with `child`, waiting on a child process (a converter)."""
    steps, interval = int(ctx.params.get("steps", 10)), float(ctx.params.get("interval", 0.5))
    load = float(ctx.params.get("load", 0))
    checkpoint = ctx.dir / "checkpoint.json"
    done = json.loads(checkpoint.read_text())["step"] if checkpoint.exists() else 0
    if load:
        ctx.progress(0, 0, stage="load", label=f"loading (simulated, {load:g} s)", unit="")
        if ctx.params.get("child"):
            subprocess.run([sys.executable, "-c", f"import time; time.sleep({load})"], check=True)
        else:
            time.sleep(load)
    ctx.log(f"attempt {ctx.attempt}: starting at step {done} of {steps}")
    with ctx.cooperative():
        while done < steps:
            ctx.check_cancel()
            time.sleep(interval)
            done += 1
            tmp = checkpoint.with_suffix(".tmp")
            tmp.write_text(json.dumps({"step": done}))
            tmp.replace(checkpoint)
            ctx.progress(done, steps)
    return {"steps": done}
