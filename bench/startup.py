"""Start-up time of the `appliance` command and of the TUI's first paint (target: < 1 s each).

Runs each in a fresh process several times against an empty workspace and prints the median and
the worst. Usage: .venv/bin/python bench/startup.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TUI_CODE = """
import time, sys
t0 = float(sys.argv[1])
from appliance import offline; offline.install()
from appliance.workspace import Workspace
from tui.app import ApplianceApp
async def first_paint(pilot):
    await pilot.pause()
    print(f"{time.time() - t0:.3f}")
    pilot.app.exit()
app = ApplianceApp(Workspace(__import__("pathlib").Path(sys.argv[2])))
app.run(headless=True, size=(80, 24), auto_pilot=first_paint)
"""


def time_command(args: list[str]) -> float:
    started = time.perf_counter()
    subprocess.run(args, check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - started


def time_tui(home: str) -> float:
    out = subprocess.run([sys.executable, "-c", TUI_CODE, repr(time.time()), home], check=True,
                         capture_output=True, text=True, cwd=ROOT)
    return float(out.stdout.strip().splitlines()[-1])


def report(name: str, samples: list[float]) -> None:
    print(f"{name:38} median {statistics.median(samples) * 1000:7.0f} ms   "
          f"worst {max(samples) * 1000:7.0f} ms   ({len(samples)} runs)")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=7)
    runs = parser.parse_args().runs
    appliance = str(Path(sys.executable).with_name("appliance"))
    with tempfile.TemporaryDirectory() as home:
        os.environ["APPLIANCE_HOME"] = home
        time_command([appliance, "--help"])  # warm the page cache once
        report("appliance --help", [time_command([appliance, "--help"]) for _ in range(runs)])
        report("appliance models list (no workspace)",
               [time_command([appliance, "models", "list"]) for _ in range(runs)])
        report("TUI first paint (no workspace, 80x24)", [time_tui(home) for _ in range(runs)])
    print(f"python {sys.version.split()[0]}, {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
