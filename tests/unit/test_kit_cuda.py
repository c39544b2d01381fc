"""The offline kit's cuda target (appliance/kit.py): it is built only from a CUDA set-up and carries
that set-up's CUDA llama-cpp-python wheel (never the CPU one of the same file name), the GPU
runtimes and a CUDA torch; it is refused on a box with no NVIDIA GPU or too old a driver; after pip,
both installers swap in the GPU runtimes kit.json names; the install records its accelerator where
`appliance doctor` reads it. pip is never run here: `kit._run` records the commands and drops small
fake wheels where pip would; nvidia-smi is a fake script on PATH."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path
from typing import Any

import pytest

from appliance import doctor, kit

ROOT = Path(__file__).resolve().parents[2]
LLAMA = "llama_cpp_python-0.3.36-py3-none-linux_x86_64.whl"
ARCHS = "75;80;86;89;90"
PINS = "onnxruntime==1.31.1\nonnxruntime-genai==0.15.2\nliger-kernel==0.6.5\ntorch==2.13.0\n"
NVIDIA_RUNTIME = "nvidia_cuda_runtime-13.0.96-py3-none-manylinux_2_27_x86_64.whl"


def _record(accelerator: str) -> dict[str, str]:
    return {"accelerator": accelerator, "why": "test",
            "cuda_architectures": ARCHS if accelerator == "cuda" else "", "llama_cpp_wheel": LLAMA}


def _set_up(tmp: Path, record: dict[str, str] | None) -> dict[str, Path]:
    """A set-up's share, its cache (the CPU and the CUDA llama wheel: one name, two contents) and a
    checkout with its constraints file."""
    share, cache, checkout = tmp / "share", tmp / "cache", tmp / "checkout"
    (share / "llama.cpp" / "bin").mkdir(parents=True)
    (share / "llama.cpp" / "gguf-py").mkdir()
    (share / "llama.cpp" / "convert_hf_to_gguf.py").write_text("# converter\n")
    for tool in kit.LLAMA_TOOLS:
        (share / "llama.cpp" / "bin" / tool).write_bytes(b"\x7fELF tool")
    (share / "models").mkdir()
    (share / "models" / "model.gguf").write_bytes(b"GGUF" * 64)
    if record is not None:
        (share / kit.SETUP_RECORD).write_text(json.dumps(record))
    cpu_dir, cuda_dir = cache / "wheels", cache / f"wheels-cuda-{ARCHS.replace(';', '-')}"
    for folder, content in ((cpu_dir, b"cpu build"), (cuda_dir, b"cuda build")):
        folder.mkdir(parents=True)
        (folder / LLAMA).write_bytes(content * 50)
    (checkout / "requirements").mkdir(parents=True)
    (checkout / "requirements" / "constraints.txt").write_text(PINS)
    return {"share": share, "cache": cache, "checkout": checkout, "cpu": cpu_dir, "cuda": cuda_dir}


def _torch_wheel(path: Path, version: str, requires: list[str]) -> None:
    meta = f"Metadata-Version: 2.1\nName: torch\nVersion: {version}\n"
    meta += "".join(f"Requires-Dist: {r}\n" for r in requires)
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("torch/__init__.py", "")
        z.writestr(f"torch-{version}.dist-info/METADATA", meta)


CUDA_TORCH = ("2.13.0", ['nvidia-cuda-runtime==13.0.96; platform_system == "Linux"', "filelock"])
CPU_TORCH = ("2.13.0+cpu", ["filelock", "sympy>=1.13.3"])


class FakePip:
    """Stands in for `kit._run`: records each command and drops what pip would have put in `-d`/`-w`.
    The appliance's download takes the llama wheel from the first --find-links folder holding it
    (`llama_from` forces one, as a PIP_FIND_LINKS folder would)."""

    def __init__(self, torch: tuple[str, list[str]] = CUDA_TORCH, llama_from: Path | None = None) -> None:
        self.commands: list[list[str]] = []
        self.envs: list[dict[str, str] | None] = []
        self.torch, self.llama_from = torch, llama_from

    def __call__(self, cmd: list[str], say: Any, env: dict[str, str] | None = None) -> None:
        self.commands.append(cmd)
        self.envs.append(env)
        if "wheel" in cmd:
            out = Path(cmd[cmd.index("-w") + 1])
            name = "gguf-0.17.1" if "gguf-py" in cmd[-1] else "appliance-0.1.0"
            name += "-py3-none-any.whl"
            (out / name).write_bytes(name.encode())
        elif "download" in cmd:
            self._download(cmd, Path(cmd[cmd.index("-d") + 1]))

    def _download(self, cmd: list[str], out: Path) -> None:
        if "appliance[edge]" in cmd or "appliance[full]" in cmd:
            links = [Path(cmd[i + 1]) for i, arg in enumerate(cmd) if arg == "--find-links"]
            source = self.llama_from or next(d for d in links if (d / LLAMA).is_file())
            shutil.copy2(source / LLAMA, out / LLAMA)
            (out / "onnxruntime-1.31.1-cp311-cp311-manylinux_2_27_x86_64.whl").write_bytes(b"ort cpu")
        if "appliance[full]" in cmd:
            version, requires = self.torch
            name = f"torch-{version}-cp311-cp311-manylinux_2_28_x86_64.whl"
            _torch_wheel(out / name, version, requires)
        if any(arg.startswith("onnxruntime-gpu") for arg in cmd):
            (out / "onnxruntime_gpu-1.31.1-cp311-cp311-manylinux_2_27_x86_64.whl").write_bytes(b"ort gpu")
            (out / NVIDIA_RUNTIME).write_bytes(b"cudart")
        for req in cmd[cmd.index("--no-deps") + 1:] if "--no-deps" in cmd else []:
            name, version = req.split("==")
            (out / f"{name.replace('-', '_')}-{version}-py3-none-any.whl").write_bytes(req.encode())

    def downloads(self) -> list[list[str]]:
        return [c for c in self.commands if "download" in c]


def _build(tmp: Path, paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch, fake: FakePip,
           accelerator: str = "cuda", profile: str = "full") -> dict[str, Any]:
    monkeypatch.setattr(kit, "_run", fake)
    return kit.build(tmp / "kit", profile=profile, accelerator=accelerator, checkout=paths["checkout"],
                     share=paths["share"], cache=paths["cache"], python="py", say=lambda _: None)


def _refused_build(tmp: Path, paths: dict[str, Path], monkeypatch: pytest.MonkeyPatch, fake: FakePip,
                   **kw: str) -> kit.KitError:
    with pytest.raises(kit.KitError) as info:
        _build(tmp, paths, monkeypatch, fake, **kw)
    return info.value


# -- building -------------------------------------------------------------------------------------
@pytest.mark.parametrize("record", [_record("cpu"), None], ids=["cpu set-up", "no record"])
def test_a_cuda_kit_is_refused_from_a_set_up_that_was_not_the_cuda_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, record: dict[str, str] | None) -> None:
    paths, fake = _set_up(tmp_path, record), FakePip()
    err = _refused_build(tmp_path, paths, monkeypatch, fake)
    assert (err.path, err.check) == (str(paths["share"] / "accelerator.json"), "accelerator")
    assert "APPLIANCE_ACCEL=cuda make setup" in err.message and "build the kit there" in err.message
    assert fake.commands == []  # refused before pip


def test_a_cpu_kit_is_refused_from_a_cuda_set_up(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths, fake = _set_up(tmp_path, _record("cuda")), FakePip()
    err = _refused_build(tmp_path, paths, monkeypatch, fake, accelerator="cpu", profile="edge")
    assert (err.path, err.check) == (str(paths["share"] / "accelerator.json"), "accelerator")
    assert "--accelerator cuda" in err.message and "APPLIANCE_ACCEL=cpu" in err.message
    assert fake.commands == []


def test_a_cuda_kit_carries_the_cuda_llama_wheel_and_the_gpu_runtimes(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths, fake = _set_up(tmp_path, _record("cuda")), FakePip()
    manifest = _build(tmp_path, paths, monkeypatch, fake)
    profile_get, no_deps_get = fake.downloads()
    links = [profile_get[i + 1] for i, arg in enumerate(profile_get) if arg == "--find-links"]
    assert str(paths["cuda"]) in links and str(paths["cpu"]) not in links
    assert not any(str(paths["cpu"]) in cmd for cmd in fake.commands)
    # onnxruntime-gpu with its deps, in one resolve with the profile (one set of nvidia-* wheels)
    assert profile_get[-2:] == ["appliance[full]", "onnxruntime-gpu[cuda,cudnn]==1.31.1"]
    assert "--no-deps" not in profile_get
    assert no_deps_get[no_deps_get.index("--no-deps") + 1:] == ["onnxruntime-genai-cuda==0.15.2",
                                                                 "liger-kernel==0.6.5"]
    constraints = str(paths["checkout"] / "requirements" / "constraints.txt")
    assert all(cmd[cmd.index("-c") + 1] == constraints for cmd in fake.downloads())
    d = tmp_path / "kit"
    assert kit.sha256_file(d / "wheels" / LLAMA) == kit.sha256_file(paths["cuda"] / LLAMA)
    assert manifest["target"]["accelerator"] == "cuda"
    assert manifest["contents"]["cuda"] == {
        "architectures": ARCHS, "cuda_major": 13, "llama_cpp_wheel": LLAMA,
        "swap": {"onnxruntime": "onnxruntime-gpu", "onnxruntime-genai": "onnxruntime-genai-cuda"},
        "extra": ["liger-kernel"], "install": ["onnxruntime-gpu[cuda,cudnn]==1.31.1"],
        "install_no_deps": ["onnxruntime-genai-cuda==0.15.2", "liger-kernel==0.6.5"]}
    assert {f"wheels/{NVIDIA_RUNTIME}", "wheels/onnxruntime_genai_cuda-0.15.2-py3-none-any.whl",
            "wheels/liger_kernel-0.6.5-py3-none-any.whl"} <= set(manifest["files"])
    # what it built is what verify accepts on a CUDA 13 box
    assert kit.verify(d, gpu=lambda: kit.Gpu(1, (13, 0)))["contents"]["cuda"]["cuda_major"] == 13


def test_an_edge_cuda_kit_adds_no_liger_and_needs_no_torch(tmp_path: Path,
                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    paths, fake = _set_up(tmp_path, _record("cuda")), FakePip(torch=CPU_TORCH)
    manifest = _build(tmp_path, paths, monkeypatch, fake, profile="edge")
    no_deps_get = fake.downloads()[-1]
    assert no_deps_get[no_deps_get.index("--no-deps") + 1:] == ["onnxruntime-genai-cuda==0.15.2"]
    assert manifest["contents"]["cuda"]["extra"] == []
    assert not any(name.startswith("torch-") for name in manifest["contents"]["wheels"])


def test_a_cpu_build_of_torch_is_refused_naming_the_wheel(tmp_path: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _set_up(tmp_path, _record("cuda"))
    err = _refused_build(tmp_path, paths, monkeypatch, FakePip(torch=CPU_TORCH))
    assert (err.path, err.check) == ("wheels/torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl",
                                     "accelerator")
    assert "a CPU build of torch; on this machine pip resolves torch to a CPU wheel" in err.message
    # a version without +cpu that needs no nvidia-* package is no CUDA build either
    err = _refused_build(tmp_path / "again", _set_up(tmp_path / "again", _record("cuda")), monkeypatch,
                         FakePip(torch=("2.13.0", ["filelock"])))
    assert err.check == "accelerator" and err.path.startswith("wheels/torch-2.13.0-")
    # nor is a +cpu version, whatever it lists
    err = _refused_build(tmp_path / "third", _set_up(tmp_path / "third", _record("cuda")), monkeypatch,
                         FakePip(torch=("2.13.0+cpu", CUDA_TORCH[1])))
    assert err.check == "accelerator" and err.path.startswith("wheels/torch-2.13.0+cpu-")


def test_a_llama_wheel_other_than_the_cached_cuda_build_is_refused(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    paths = _set_up(tmp_path, _record("cuda"))
    err = _refused_build(tmp_path, paths, monkeypatch, FakePip(llama_from=paths["cpu"]))
    assert (err.path, err.check) == (f"wheels/{LLAMA}", "accelerator")
    assert "differs from set-up's build" in err.message


def test_a_cuda_kit_needs_the_cached_cuda_llama_wheel(tmp_path: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    paths, fake = _set_up(tmp_path, _record("cuda")), FakePip()
    (paths["cuda"] / LLAMA).unlink()
    err = _refused_build(tmp_path, paths, monkeypatch, fake)
    assert (err.path, err.check) == (str(paths["cuda"] / LLAMA), "set-up")
    assert fake.commands == []


def test_a_cpu_kit_takes_the_cpu_cache_and_adds_nothing(tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    paths, fake = _set_up(tmp_path, _record("cpu")), FakePip()
    manifest = _build(tmp_path, paths, monkeypatch, fake, accelerator="cpu", profile="edge")
    (profile_get,) = fake.downloads()
    assert str(paths["cpu"]) in profile_get and str(paths["cuda"]) not in profile_get
    assert "cuda" not in manifest["contents"] and manifest["target"]["accelerator"] == "cpu"
    assert kit.sha256_file(tmp_path / "kit" / "wheels" / LLAMA) == kit.sha256_file(paths["cpu"] / LLAMA)


# -- verifying on the air-gapped box --------------------------------------------------------------
def _kit(root: Path, cuda: dict[str, Any] | None = None, accelerator: str = "cuda") -> Path:
    d = root / "kit"
    (d / "wheels").mkdir(parents=True)
    (d / "wheels" / "onnxruntime-1.31.1-cp311-cp311-manylinux_2_27_x86_64.whl").write_bytes(b"ort cpu")
    (d / "wheels" / "appliance-0.1.0-py3-none-any.whl").write_bytes(b"appliance")
    (d / "wheels" / LLAMA).write_bytes(b"cuda build")
    if cuda is None:
        cuda = {"architectures": ARCHS, "cuda_major": 13, "swap": dict(kit.GPU_BUILDS), "extra": [],
                "install": ["onnxruntime-gpu[cuda,cudnn]==1.31.1"],
                "install_no_deps": ["onnxruntime-genai-cuda==0.15.2"]}
    kit.write_manifest(d, profile="edge", target=kit.Target.here(accelerator), version="0.1.0",
                       contents={"cuda": cuda} if cuda else {})
    return d


def _smi(bin_dir: Path, listing: str, header: str) -> None:
    bin_dir.mkdir(exist_ok=True)
    path = bin_dir / "nvidia-smi"
    path.write_text(f"#!/bin/sh\nif [ \"$1\" = -L ]; then printf '%s\\n' '{listing}'; "
                    f"else printf '%s\\n' '{header}'; fi\n")
    path.chmod(0o755)


H100 = "GPU 0: NVIDIA H100 80GB HBM3 (UUID: GPU-5e5e)"
CUDA13 = "| NVIDIA-SMI 580.65.06    Driver Version: 580.65.06    CUDA Version: 13.0     |"
CUDA12 = "| NVIDIA-SMI 550.54.15    Driver Version: 550.54.15    CUDA Version: 12.4     |"


def _refused_verify(d: Path) -> kit.KitError:
    with pytest.raises(kit.KitError) as info:
        kit.verify(d)
    assert (info.value.path, info.value.check) == (kit.MANIFEST, "accelerator"), str(info.value)
    return info.value


def test_a_cuda_kit_is_refused_on_a_box_with_no_gpu_before_hashing(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    monkeypatch.setenv("PATH", str(bin_dir))  # no nvidia-smi at all
    d = _kit(tmp_path)
    (d / "wheels" / LLAMA).write_bytes(b"damaged")  # not reached: the GPU is checked first
    err = _refused_verify(d)
    assert "no NVIDIA GPU (there is no nvidia-smi)" in err.message and "cpu kit" in err.message
    _smi(bin_dir, "No devices were found", "NVIDIA-SMI has failed")
    err = _refused_verify(d)
    assert "-L` lists no GPU" in err.message


def test_a_cuda_kit_is_refused_on_a_driver_too_old_for_its_cuda(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    _smi(tmp_path / "bin", H100, CUDA12)
    err = _refused_verify(_kit(tmp_path))
    assert "driver for CUDA 13, this one supports CUDA 12.4" in err.message
    assert "update the driver to one that supports CUDA 13" in err.message
    _smi(tmp_path / "bin", H100, "| NVIDIA-SMI has no header today |")
    assert "supports no CUDA version" in _refused_verify(tmp_path / "kit").message


def test_a_cuda_kit_verifies_on_a_cuda_13_box_and_a_cpu_kit_anywhere(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))
    _smi(tmp_path / "bin", H100, CUDA13)
    assert kit.probe_gpu() == kit.Gpu(1, (13, 0), str(tmp_path / "bin" / "nvidia-smi"))
    assert kit.verify(_kit(tmp_path))["target"]["accelerator"] == "cuda"
    cpu = _kit(tmp_path / "cpu", cuda={}, accelerator="cpu")
    assert kit.verify(cpu)["target"]["accelerator"] == "cpu"  # a GPU box takes a cpu kit
    (tmp_path / "bin" / "nvidia-smi").unlink()
    assert kit.verify(cpu)["target"]["accelerator"] == "cpu"  # and so does a box with none


def test_a_hung_nvidia_smi_is_named_and_not_waited_for(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """A driver in trouble: nvidia-smi does not answer. verify says so (not "no GPU: use a cpu kit")
    after SMI_TIMEOUT, and `--no-gpu-check` still checks the files on a box without the GPU."""
    d = _kit(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\nexec sleep 30\n")
    (bin_dir / "nvidia-smi").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    monkeypatch.setattr(kit, "SMI_TIMEOUT", 0.5)
    gpu = kit.probe_gpu()
    assert gpu.hung and gpu.count == 0
    with pytest.raises(kit.KitError, match="did not answer in 0 s: check the NVIDIA driver"):
        kit.verify(d)
    assert kit.verify(d, gpu=None)["target"]["accelerator"] == "cuda"
    assert kit.main(["verify", str(d), "--no-gpu-check"]) == 0


def test_a_cuda_kit_that_names_no_gpu_runtimes_is_refused(tmp_path: Path) -> None:
    """A kit built before the cuda target was real: its target said cuda, its wheels were CPU ones."""
    d = _kit(tmp_path, cuda={})
    with pytest.raises(kit.KitError) as info:
        kit.verify(d, gpu=lambda: kit.Gpu(1, (13, 0)))
    assert info.value.check == "accelerator" and "build it again" in info.value.message


def test_the_bare_verifier_refuses_a_cuda_kit_without_a_gpu(tmp_path: Path) -> None:
    """`python3 -I verify.py verify KIT`, as install.sh runs it: nvidia-smi is found on PATH."""
    d = _kit(tmp_path)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    env = {**os.environ, "PATH": str(bin_dir)}
    run = subprocess.run([sys.executable, "-I", "-S", str(Path(kit.__file__)), "verify", str(d)],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 2 and "kit.json: accelerator: the kit is for CUDA" in run.stderr, run.stderr
    _smi(bin_dir, H100, CUDA13)
    run = subprocess.run([sys.executable, "-I", "-S", str(Path(kit.__file__)), "verify", str(d)],
                         capture_output=True, text=True, env=env)
    assert run.returncode == 0 and "kit verified" in run.stdout, run.stderr


# -- installing: the runtime swap, and the record -------------------------------------------------
def _full_kit(root: Path) -> Path:
    return _kit(root, cuda={"architectures": ARCHS, "cuda_major": 13, "swap": dict(kit.GPU_BUILDS),
                            "extra": ["liger-kernel"], "install": ["onnxruntime-gpu[cuda,cudnn]==1.31.1"],
                            "install_no_deps": ["onnxruntime-genai-cuda==0.15.2", "liger-kernel==0.6.5"]})


def test_a_cuda_kit_swaps_in_the_gpu_runtimes_from_the_kit_only(tmp_path: Path) -> None:
    d = _full_kit(tmp_path)
    manifest = kit.read_manifest(d)
    offline = ["install", "-q", "--no-index", "--no-cache-dir", "--disable-pip-version-check",
               "--find-links", str(d / "wheels")]
    pip = ["/venv/bin/python", "-m", "pip"]
    fresh = {"onnxruntime": "1.31.1", "numpy": "2.4.6"}  # pip just installed the profile: the CPU build
    assert kit.accelerate_commands(d, manifest, "/venv/bin/python", fresh) == [
        [*pip, "uninstall", "-q", "-y", "onnxruntime"],
        [*pip, *offline, "onnxruntime-gpu[cuda,cudnn]==1.31.1"],
        [*pip, *offline, "--no-deps", "onnxruntime-genai-cuda==0.15.2", "liger-kernel==0.6.5"]]
    # over an earlier cuda install, pip put the CPU onnxruntime over the GPU one: both go first
    again = kit.accelerate_commands(d, manifest, "py", dict.fromkeys(
        ("onnxruntime", "onnxruntime-gpu", "onnxruntime-genai-cuda"), "1"))
    assert again[0] == ["py", "-m", "pip", "uninstall", "-q", "-y", "onnxruntime", "onnxruntime-gpu",
                        "onnxruntime-genai-cuda"]


def test_a_cpu_kit_swaps_back_only_over_a_gpu_install(tmp_path: Path) -> None:
    d = _kit(tmp_path, cuda={}, accelerator="cpu")
    manifest = kit.read_manifest(d)
    assert kit.accelerate_commands(d, manifest, "py", {"onnxruntime": "1.31.1"}) == []
    unknown = kit.accelerate_commands(d, manifest, "py", None)  # cannot tell: every build may be there
    assert unknown[0] == ["py", "-m", "pip", "uninstall", "-q", "-y", "onnxruntime", "onnxruntime-gpu",
                          "onnxruntime-genai", "onnxruntime-genai-cuda"]
    assert kit.accelerate_commands(d, manifest, "py", {"onnxruntime": "1", "onnxruntime-gpu": "1"}) == [
        ["py", "-m", "pip", "uninstall", "-q", "-y", "onnxruntime", "onnxruntime-gpu"],
        ["py", "-m", "pip", "install", "-q", "--no-index", "--no-cache-dir", "--disable-pip-version-check",
         "--find-links", str(d / "wheels"), "--no-deps", "onnxruntime==1.31.1"]]


def test_accelerate_runs_pip_with_its_configuration_off(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fake = FakePip()
    monkeypatch.setattr(kit, "_run", fake)
    done = kit.accelerate(_full_kit(tmp_path), "py", say=lambda _: None,
                          installed={"onnxruntime": "1.31.1"})
    assert fake.commands == done and len(done) == 4  # the swap, then the kit's llama build again
    assert all(env is not None and env["PIP_CONFIG_FILE"] == os.devnull for env in fake.envs)


def test_the_kit_s_own_builds_replace_those_pip_keeps_at_the_same_version(tmp_path: Path) -> None:
    """`pip install --upgrade` keeps an installed llama-cpp-python 0.3.36 and torch 2.13.0+cpu (both
    satisfy the profile): the kit's llama wheel is always put in place again, its torch wheel when
    the installed torch is another build."""
    d = _full_kit(tmp_path)
    torch = "torch-2.13.0-cp311-cp311-manylinux_2_28_x86_64.whl"
    _torch_wheel(d / "wheels" / torch, *CUDA_TORCH)
    manifest = kit.write_manifest(d, profile="full", target=kit.Target.here("cuda"), version="0.1.0",
                                  contents=kit.read_manifest(d)["contents"])
    force = ["py", "-m", "pip", "install", "-q", "--no-index", "--no-cache-dir",
             "--disable-pip-version-check", "--force-reinstall", "--no-deps"]
    over_cpu = kit.reinstall_commands(d, manifest, "py", {"torch": "2.13.0+cpu"})
    assert over_cpu == [[*force, str(d / "wheels" / LLAMA), str(d / "wheels" / torch)]]
    same = kit.reinstall_commands(d, manifest, "py", {"torch": "2.13.0"})
    assert same == [[*force, str(d / "wheels" / LLAMA)]]
    assert kit.reinstall_commands(d, manifest, "py", None)[0][-1] == str(d / "wheels" / torch)


def test_installed_versions_are_read_from_the_environment_s_python() -> None:
    found = kit.installed_versions(sys.executable, ["pytest", "no-such-package-here"])
    assert found is not None and set(found) == {"pytest"} and found["pytest"][0].isdigit()
    assert kit.installed_versions("/nonexistent/python", ["pytest"]) is None


def test_a_failed_swap_says_the_environment_may_be_half_swapped(tmp_path: Path,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    assert kit.main(["accelerate", str(_full_kit(tmp_path)), "/nonexistent/python"]) == 2
    err = capsys.readouterr().err
    assert "kit runtimes not installed" in err and "run the installer again" in err


def test_both_installers_swap_after_pip_and_before_the_record() -> None:
    """install.sh (in every kit) and `scripts/setup.sh --kit` run the same `accelerate`."""
    setup = (ROOT / "scripts" / "setup.sh").read_text()
    branch = setup[setup.index('if [ -n "$KIT" ]; then'):]
    for text, call in ((kit.INSTALL_SH, '"$KIT/verify.py" accelerate "$KIT" "$VENV/bin/python"'),
                       (branch, 'appliance/kit.py accelerate "$KIT" "$VENV/bin/python"')):
        assert text.index('"appliance[$PROFILE]"') < text.index(call) < text.index(" record "), call


def test_record_writes_the_accelerator_doctor_reads(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    d = _full_kit(tmp_path)
    share = tmp_path / "share"
    kit.record(d, share)
    created = kit.read_manifest(d)["created"]
    assert json.loads((share / "accelerator.json").read_text()) == {
        "accelerator": "cuda", "why": f"installed from the cuda kit built {created}",
        "cuda_architectures": ARCHS, "llama_cpp_wheel": LLAMA}
    monkeypatch.setenv("APPLIANCE_SHARE", str(share))
    chose = doctor.setup_accelerator()
    assert chose is not None and chose["accelerator"] == "cuda"
    lost = {"setup": chose, "llama_cpp_gpu_offload": False, "onnxruntime_providers": ["CPUExecutionProvider"]}
    assert len(doctor._runtime_problems(lost)) == 2  # doctor checks a kit's cuda install as a set-up's
    cpu = _kit(tmp_path / "cpu", cuda={}, accelerator="cpu")
    kit.record(cpu, share)
    assert json.loads((share / "accelerator.json").read_text())["accelerator"] == "cpu"
    assert json.loads((share / "accelerator.json").read_text())["cuda_architectures"] == ""
