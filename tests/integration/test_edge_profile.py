"""The edge profile's proof, on the real embedded SmolLM2 GGUF, in child processes where torch,
transformers, peft, safetensors and sentencepiece cannot be imported (`sys.modules[name] = None`
before the appliance is imported, as on an edge install): importing the default model makes a
serve-only model (no HF folder, the GGUF hashed), `engines.resolve` opens it by the model's name
and llama.cpp generates from it; `appliance chat NAME` answers one turn; the server answers one
request on loopback; none of the blocked libraries was ever imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from appliance import manifest, stack
from appliance.workspace import ArtifactRecord
from tests.tmpdirs import ModuleTemp

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[2]
BLOCKED = ("torch", "transformers", "peft", "safetensors", "sentencepiece", "bitsandbytes", "optimum")
EDGE = f"import sys\nfor _name in {BLOCKED!r}:\n    sys.modules[_name] = None\n"
LOADED = ("print('LOADED', __import__('json').dumps(sorted(n for n in sys.modules if n.split('.')[0]"
          f" in {BLOCKED!r} and sys.modules[n] is not None)))\n")


def _run(code: str, home: Path, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "APPLIANCE_HOME": str(home)}
    env.pop("APPLIANCE_PROFILE", None)  # the profile must come from what is importable
    return subprocess.run([sys.executable, "-c", EDGE + code], cwd=ROOT, env=env, input=stdin,
                          capture_output=True, text=True, timeout=300)


def _loaded(out: str) -> list[str]:
    return json.loads(next(line for line in out.splitlines() if line.startswith("LOADED "))[7:])


@pytest.fixture(scope="module")
def edge_home(module_tmp: ModuleTemp) -> Path:
    """A workspace where the default model was imported on the edge profile, and what the child
    that imported it, opened it and served it reported."""
    home = module_tmp.mktemp("edge") / "ws"
    code = textwrap.dedent("""
        import asyncio, json, urllib.request
        from appliance import profile
        from appliance.runtime import engines, keys, server, service
        from appliance.stages.models import importer
        from appliance.workspace import Workspace

        ws = Workspace()
        out = {"profile": profile.current()}
        record = importer.import_default(ws)
        out["name"] = record.name
        artifact = engines.resolve(record.name, ws)
        out["artifact"] = [artifact.kind, str(artifact.path)]
        engine = engines.open_engine(artifact, threads=1, context_length=512)
        items = list(engine.generate([{"role": "user", "content": "Name a colour."}],
                                     engines.Sampling(temperature=0.0, max_tokens=4)))
        out["generated"] = [items[-1].reason, items[-1].completion_tokens]
        engine.close()

        key = keys.create(ws, "edge-test")
        srv = service.load(ws, service.ServeOptions((record.name,), port=0, threads=1, context=512),
                           lambda _: None)

        def ask(port):
            body = json.dumps({"model": record.name, "max_tokens": 4, "temperature": 0,
                               "messages": [{"role": "user", "content": "Say hi."}]}).encode()
            req = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                         headers={"Authorization": f"Bearer {key}",
                                                  "Content-Type": "application/json"})
            with urllib.request.urlopen(req, timeout=60) as response:
                return json.loads(response.read())

        async def serve_one():
            runner, port = await server.start(srv)
            try:
                return await asyncio.get_running_loop().run_in_executor(None, ask, port)
            finally:
                await runner.cleanup()

        answer = asyncio.run(serve_one())
        out["served"] = [answer["model"], answer["usage"]["completion_tokens"],
                         answer["choices"][0]["finish_reason"]]
        print("RESULT", json.dumps(out))
    """) + LOADED
    done = _run(code, home)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads(next(line for line in done.stdout.splitlines() if line.startswith("RESULT "))[7:])
    (home / "edge-result.json").write_text(json.dumps({**result, "loaded": _loaded(done.stdout)}))
    return home


def _result(home: Path) -> dict:
    return json.loads((home / "edge-result.json").read_text())


def test_the_default_import_on_edge_is_a_serve_only_model(edge_home: Path) -> None:
    result = _result(edge_home)
    assert result["profile"] == "edge" and result["name"] == stack.DEFAULT_MODEL_NAME
    folder = edge_home / "models" / stack.DEFAULT_MODEL_NAME
    data = manifest.verify(folder)  # every file against its sha256
    info = data["info"]
    assert info["serve_only"] is True and info["summary"]["serve_only"] is True
    assert info["gguf_file"] == f"gguf/{stack.DEFAULT_MODEL_FILE}"
    assert info["gguf_sha256"] == stack.DEFAULT_MODEL_SHA256 == data["config"]["source"]["sha256"]
    assert data["files"][info["gguf_file"]]["sha256"] == stack.DEFAULT_MODEL_SHA256
    # no HF folder, no tokenizer files: the GGUF and the licence text that ships beside it
    assert sorted(data["files"]) == [info["gguf_file"], "licenses/SmolLM2-LICENSE.txt"]
    assert info["license"]["id"] == "apache-2.0" and info["license"]["files"] == [
        "licenses/SmolLM2-LICENSE.txt"]
    assert info["stop_tokens"] == ["<|im_end|>"] and info["stop_token_ids"] == [2]
    assert info["eos_token"] == "<|im_end|>" and info["template_check"]["checked"] is True
    assert info["architecture"] == "LlamaForCausalLM" and info["context_length"] == 8192
    assert info["dtype"] == "Q4_1" and info["parameters"] > 100_000_000


def test_it_is_opened_by_name_generates_and_is_served_without_torch(edge_home: Path) -> None:
    result = _result(edge_home)
    assert result["artifact"] == ["gguf", str(edge_home / "models" / stack.DEFAULT_MODEL_NAME / "gguf"
                                              / stack.DEFAULT_MODEL_FILE)]
    assert result["generated"][1] > 0
    assert result["served"][0] == stack.DEFAULT_MODEL_NAME and result["served"][1] > 0
    assert result["loaded"] == []


def test_appliance_chat_answers_one_turn_by_model_name(edge_home: Path) -> None:
    code = ("import runpy\nsys.argv = ['appliance.runtime.console', 'chat', "
            f"{stack.DEFAULT_MODEL_NAME!r}, '--threads', '1', '--temperature', '0', '--max-tokens', '6']\n"
            "try:\n    runpy.run_module('appliance.runtime.console', run_name='__main__')\n"
            "except SystemExit as exc:\n    print('EXIT', exc.code)\n" + LOADED)
    done = _run(code, edge_home, stdin="Name a colour.\n/quit\n")
    assert "EXIT 0" in done.stdout, done.stderr[-3000:]
    answer = done.stdout.split("EXIT")[0].strip()
    assert answer and "<|im_end|>" not in answer
    assert "Traceback" not in done.stderr
    assert _loaded(done.stdout) == []


def test_training_from_it_is_refused_in_one_line(edge_home: Path) -> None:
    code = ("from appliance.stages.models import importer\nfrom appliance.workspace import Workspace\n"
            "from appliance.errors import RefusedError\n"
            f"record = Workspace().get('model', {stack.DEFAULT_MODEL_NAME!r})\n"
            "try:\n    importer.require_trainable(record)\nexcept RefusedError as exc:\n"
            "    print('REFUSED', exc.message)\n" + LOADED)
    done = _run(code, edge_home)
    assert "REFUSED training needs the full profile (this install is the edge profile)" in done.stdout, \
        done.stderr[-2000:]
    assert _loaded(done.stdout) == []


def test_on_the_full_profile_the_import_is_unchanged_and_its_gguf_is_served_by_name(
        smol_model: ArtifactRecord) -> None:
    """The full profile still dequantizes (an HF folder, trainable); chat and serve take the
    model's name and open the GGUF it came as."""
    from appliance.runtime.engines import resolve
    from appliance.stages.models import importer
    from appliance.workspace import Workspace

    assert (smol_model.path / "config.json").is_file() and not smol_model.summary.get("serve_only")
    importer.require_trainable(smol_model)
    ws = Workspace(smol_model.path.parents[1])
    artifact = resolve(smol_model.name, ws)
    assert (artifact.kind, artifact.path) == ("gguf", smol_model.path / "gguf" / stack.DEFAULT_MODEL_FILE)
