"""The air-gapped install, for real: build an edge kit here (the one networked step), then inside a
network namespace with no network install it into a fresh venv and use it: import the default
model, one chat turn, and the API server answering one request on loopback, all under
`strace -f -e trace=connect`, which must show no connection attempt beyond loopback.

Needs root (unshare), strace and iproute2 (CI has them; .ci/run installs what is missing), and the
package index for the build; without them the test says what is missing and skips."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import appliance
from appliance import kit, offline, stack
from tests.tmpdirs import ModuleTemp

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]


def _missing() -> str | None:
    if os.geteuid() != 0:
        return "needs root for a network namespace (unshare -n)"
    for tool in ("unshare", "strace", "ip"):
        if shutil.which(tool) is None:
            return f"needs {tool}"
    if subprocess.run(["unshare", "-n", "true"], capture_output=True).returncode != 0:
        return "unshare -n is not permitted here"
    return None


NEWER = "0.1.0.post1"  # the version of the second kit, installed over the first


def _build(checkout: Path, kit_dir: Path) -> Path:
    out = subprocess.run([sys.executable, str(checkout / "appliance" / "kit.py"), "build", str(kit_dir),
                          "--profile", "edge", "--share", str(stack.share_dir())],
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    return kit_dir


@pytest.fixture(scope="module")
def edge_kits(module_tmp: ModuleTemp) -> tuple[Path, Path]:
    """An edge kit of this checkout, and one of a copy whose version is NEWER (an upgrade)."""
    why = _missing()
    if why:
        pytest.skip(why)
    d = module_tmp.mktemp("kit")
    newer = d / "checkout"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                           capture_output=True, text=True).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (newer / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, newer / name)
    init = newer / "appliance" / "__init__.py"
    text = init.read_text()
    assert f'__version__ = "{appliance.__version__}"' in text
    init.write_text(text.replace(f'"{appliance.__version__}"', f'"{NEWER}"'))
    return _build(ROOT, d / "edge"), _build(newer, d / "edge-newer")


SCRIPT = """
set -eu
ip link set lo up
"$KIT/install.sh" "$VENV"
export APPLIANCE_HOME="$WS"
A="$VENV/bin/appliance"
"$A" doctor > "$OUT/doctor.txt" 2>&1 || true
"$VENV/share/appliance/llama.cpp/bin/llama-imatrix" --version > "$OUT/imatrix.txt" 2>&1
"$A" models import --default > "$OUT/import.txt" 2>&1
KEY=$("$A" keys create offline-test | head -n1)
printf 'Name a colour.\\n/exit\\n' \\
  | "$A" chat --max-tokens 8 --temperature 0 "$MODEL_ID" > "$OUT/chat.txt" 2>&1
"$A" serve "$MODEL_ID" --port 18431 --threads 1 --context 512 > "$OUT/serve.txt" 2>&1 &
SERVER=$!
"$VENV/bin/python" - "$KEY" "$MODEL_ID" > "$OUT/reply.json" <<'EOF'
import json, sys, time, urllib.request
key, model = sys.argv[1], sys.argv[2]
body = json.dumps({"model": model, "max_tokens": 8, "temperature": 0,
                   "messages": [{"role": "user", "content": "Say hi."}]}).encode()
for _ in range(300):
    try:
        req = urllib.request.Request("http://127.0.0.1:18431/v1/chat/completions", data=body,
                                     headers={"Authorization": f"Bearer {key}",
                                              "Content-Type": "application/json"})
        print(urllib.request.urlopen(req, timeout=60).read().decode())
        break
    except OSError:
        time.sleep(0.2)
EOF
kill $SERVER
wait $SERVER || true
"$NEWER_KIT/install.sh" "$VENV" > "$OUT/upgrade.txt" 2>&1  # a newer kit: the workspace stays
"$A" doctor > "$OUT/doctor-after.txt" 2>&1 || true
"$A" models list --json > "$OUT/models-after.json"
"""


def test_an_edge_kit_installs_and_serves_with_no_network(edge_kits: tuple[Path, Path],
                                                         tmp_path: Path) -> None:
    edge_kit, newer_kit = edge_kits
    manifest = kit.verify(edge_kit, profile="edge")
    names = manifest["contents"]["wheels"]
    assert any(n.startswith("llama_cpp_python-") for n in names)
    assert not any(n.startswith(("torch-", "transformers-")) for n in names)  # the edge profile
    assert {"share/llama.cpp/bin/llama-imatrix", "share/llama.cpp/bin/llama-quantize"} <= \
        set(manifest["files"])  # llama.cpp's tools travel, hashed like every file
    out, trace = tmp_path / "out", tmp_path / "connect.trace"
    out.mkdir()
    env = {**os.environ, "KIT": str(edge_kit), "NEWER_KIT": str(newer_kit),
           "VENV": str(tmp_path / "venv"), "WS": str(tmp_path / "ws"),
           "OUT": str(out), "MODEL_ID": stack.DEFAULT_MODEL_NAME, "PIP_CONFIG_FILE": os.devnull}
    env.pop("PYTHONPATH", None)
    env.pop("VIRTUAL_ENV", None)
    run = subprocess.run(["unshare", "-n", "strace", "-f", "-qq", "-e", "trace=connect", "-o", str(trace),
                          "sh", "-c", textwrap.dedent(SCRIPT)], env=env, capture_output=True, text=True,
                         timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    chat = (out / "chat.txt").read_text()
    assert "Traceback" not in chat and stack.DEFAULT_MODEL_NAME in chat, chat
    assert "serve" in (tmp_path / "ws" / "models" / stack.DEFAULT_MODEL_NAME / "manifest.json").read_text()
    reply = json.loads((out / "reply.json").read_text())
    assert reply["choices"][0]["message"]["content"] and reply["usage"]["completion_tokens"] > 0
    python = (tmp_path / "venv" / "bin" / "python")
    torch = subprocess.run([str(python), "-c", "import torch"], capture_output=True, env=env)
    assert torch.returncode != 0  # nothing of the full profile came along
    assert offline.connects_beyond_loopback(trace.read_text()) == []
    # the tools run in the new venv (their runpath finds its llama_cpp/lib), with no network
    assert "llama-cpp-python" in (out / "imatrix.txt").read_text(), (out / "imatrix.txt").read_text()
    doctor = (out / "doctor-after.txt").read_text()
    assert f"kit         appliance {NEWER}, edge profile" in doctor, doctor
    assert f"previous    appliance {appliance.__version__}, edge profile" in doctor, doctor
    models = json.loads((out / "models-after.json").read_text())
    assert [m["name"] for m in models] == [stack.DEFAULT_MODEL_NAME]


def test_the_loopback_filter_flags_outside_connections() -> None:
    trace = "\n".join([
        '12 connect(3, {sa_family=AF_UNIX, sun_path="/run/x"}, 110) = 0',
        '12 connect(4, {sa_family=AF_INET, sin_port=htons(18431), sin_addr=inet_addr("127.0.0.1")}, 16) = 0',
        '12 connect(5, {sa_family=AF_INET, sin_port=htons(443), sin_addr=inet_addr("18.160.0.1")}, 16) = -1',
        '12 connect(6, {sa_family=AF_INET6, sin6_port=htons(80), '
        'inet_pton(AF_INET6, "::1", &sin6_addr)}, 28) = 0',
    ])
    assert offline.connects_beyond_loopback(trace) == [trace.splitlines()[2]]
