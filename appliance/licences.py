"""Licences travel with what is made from them.

At import, a model or dataset keeps its licence: the texts found beside it (LICENSE*, LICENCE*,
COPYING*, NOTICE*, ATTRIBUTION* files, copied into the artifact's `licenses/`), the id its GGUF
metadata (`general.license`, `.name`, `.link`) or its model card (README front matter `license:`)
declares, or the operator's `--license`, and an attribution line (name, organisation, source). It
is `info.license` in the manifest.

Everything made from them (runs, merged models, exports) carries the list of its ancestors'
licences (`info.licenses`: role, artifact, id, attribution, and the texts copied under
`licenses/<kind>-<name>/`), GGUF exports write it as `general.license` and
`general.base_model.*` / `general.dataset.*` (llama.cpp's convention for lineage), a Modelfile as
LICENSE, a bundle in bundle.json and its BOM. An id is found in a text only for a few licences
whose wording is unmistakable (`detect`); otherwise it stays what the source declared, or
"unknown".
"""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Any

from appliance.errors import RefusedError
from appliance.workspace import ancestors as walk_lineage

if TYPE_CHECKING:
    from appliance.workspace import Workspace

FOLDER = "licenses"
NAME_RE = re.compile(r"(licen[cs]e|copying|notice|attribution)", re.IGNORECASE)
MAX_TEXT = 1 << 20
# Unmistakable wording -> SPDX id. Checked in order; the first that matches wins.
KNOWN = (
    (re.compile(r"Apache License\s+Version 2\.0", re.I), "Apache-2.0"),
    (re.compile(r"CC BY-SA 3\.0|Attribution-ShareAlike 3\.0", re.I), "CC-BY-SA-3.0"),
    (re.compile(r"CC BY-SA 4\.0|Attribution-ShareAlike 4\.0", re.I), "CC-BY-SA-4.0"),
    (re.compile(r"CC BY 4\.0|Creative Commons Attribution 4\.0", re.I), "CC-BY-4.0"),
    (re.compile(r"^\s*MIT License", re.I | re.M), "MIT"),
)


def detect(text: str) -> str | None:
    for pattern, spdx in KNOWN:
        if pattern.search(text):
            return spdx
    return None


def files_beside(path: Path) -> list[Path]:
    """Licence and attribution texts for a file (its folder) or a folder (its top level)."""
    folder = path if path.is_dir() else path.parent
    try:
        found = [p for p in sorted(folder.iterdir()) if NAME_RE.search(p.name)
                 and p.is_file() and not p.is_symlink() and p.stat().st_size <= MAX_TEXT]
    except OSError:
        return []
    return found


def copy_texts(files: list[Path], dest: Path) -> list[str]:
    """Copy licence texts into `dest/licenses/`; their paths relative to `dest`."""
    if not files:
        return []
    folder = dest / FOLDER
    folder.mkdir(mode=0o700, exist_ok=True)
    out = []
    for src in files:
        _safe_copy(src, folder / src.name)
        out.append(f"{FOLDER}/{src.name}")
    return out


def _safe_copy(src: Path, dst: Path) -> None:
    """A licence text into the artifact: never through a link, never a FIFO or device, 1 MiB at most."""
    try:
        fd = os.open(src, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError as exc:
        raise RefusedError(f"{src}: cannot read it as a regular file ({exc.strerror})") from None
    with os.fdopen(fd, "rb") as fh:
        if not stat.S_ISREG(os.fstat(fh.fileno()).st_mode):
            raise RefusedError(f"{src} is not a regular file")
        data = fh.read(MAX_TEXT + 1)[:MAX_TEXT]
    with open(dst, "wb", opener=lambda p, flags: os.open(p, flags, 0o600)) as out:
        out.write(data)


def from_gguf(meta: dict[str, Any]) -> dict[str, Any]:
    """What a GGUF's metadata says of its licence and origin."""
    found: dict[str, Any] = {}
    for key, field in (("general.license", "id"), ("general.license.name", "name"),
                       ("general.license.link", "link")):
        if meta.get(key):
            found[field] = str(meta[key])
    who = meta.get("general.organization") or meta.get("general.author")
    source = meta.get("general.source.url") or meta.get("general.repo_url") \
        or meta.get("general.source.repo_url") or meta.get("general.url")
    if meta.get("general.name"):
        found["attribution"] = " ".join(filter(None, [
            str(meta["general.name"]), f"by {who}" if who else "", f"({source})" if source else ""]))
    if source:
        found["source"] = str(source)
    return found


def from_model_card(folder: Path) -> dict[str, Any]:
    """`license`, `license_name`, `license_link` from a README's YAML front matter (read as plain
    `key: value` lines, no YAML library needed for these three)."""
    readme = folder / "README.md"
    if not readme.is_file():
        return {}
    text = readme.read_text(encoding="utf-8", errors="replace")[:MAX_TEXT]
    if not text.startswith("---"):
        return {}
    front = text[3:].split("\n---", 1)[0]
    found = {}
    for line in front.splitlines():
        key, _, value = line.partition(":")
        value = value.strip().strip("'\"")
        if value and key.strip() in ("license", "license_name", "license_link"):
            found[{"license": "id", "license_name": "name", "license_link": "link"}[key.strip()]] = value
    return found


def record(declared: dict[str, Any], texts: list[str], dest: Path,
           given: str | None = None, attribution: str | None = None) -> dict[str, Any] | None:
    """The `info.license` of an imported artifact, or None when nothing at all is known."""
    lic = dict(declared)
    if given:
        lic["id"] = given
    if attribution:
        lic["attribution"] = attribution
    if "id" not in lic:
        for rel in texts:
            if spdx := detect((dest / rel).read_text(encoding="utf-8", errors="replace")):
                lic["id"], lic["detected_from"] = spdx, rel
                break
    if texts:
        lic["files"] = texts
    if not lic:
        return None
    lic.setdefault("id", "unknown")
    return lic


# -- what descendants carry ------------------------------------------------------------------------
def ancestors(ws: Workspace, parents: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The licences of every model and dataset an artifact comes from (nearest first, each once):
    [{role, kind, name, id, attribution?, link?, files?, path}]."""
    out = []
    for ref, record, data in walk_lineage(ws, parents):
        if record is None or data is None:  # removed since: its licence is what the child recorded
            continue
        key = (str(ref.get("kind")), str(ref.get("name")))
        own = data.get("info", {}).get("license")
        if own and key[0] in ("model", "dataset"):
            role = "dataset" if key[0] == "dataset" else (
                "base model" if not data.get("parents") else "model")
            out.append({"role": role, "kind": key[0], "name": key[1], **own,
                        "path": str(record.path)})
    return out


def carry(ws: Workspace, parents: list[dict[str, Any]], dest: Path) -> list[dict[str, Any]]:
    """Copy the ancestors' licence texts into `dest/licenses/<kind>-<name>/` and return the list
    for the child's `info.licenses` (paths relative to `dest`)."""
    out = []
    for lic in ancestors(ws, parents):
        src_root = Path(lic.pop("path"))
        files = []
        for rel in lic.get("files", []):
            target = Path(FOLDER) / f"{lic['kind']}-{lic['name']}" / Path(rel).name
            (dest / target).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
            if (src_root / rel).is_file():
                _safe_copy(src_root / rel, dest / target)
                files.append(target.as_posix())
        out.append({**lic, "files": files})
    return out


def gguf_metadata(licences: list[dict[str, Any]]) -> tuple[dict[str, Any], dict[str, Any]]:
    """(model card front matter, converter --metadata override) for a GGUF export: the base
    model's licence as general.license, the models and datasets as general.base_model.* and
    general.dataset.*."""
    base = next((lic for lic in licences if lic["role"] == "base model"), None)
    card: dict[str, Any] = {}
    override: dict[str, Any] = {}
    if base and base.get("id") and base["id"] != "unknown":
        card["license"] = base["id"]
        if base.get("name"):
            override["general.license.name"] = base["name"]
        if base.get("link"):
            override["general.license.link"] = base["link"]
    models = [{k: v for k, v in (("name", lic["name"]), ("description", lic.get("attribution")),
                                 ("repo_url", lic.get("source"))) if v}
              for lic in licences if lic["kind"] == "model"]
    datasets = [{k: v for k, v in (("name", lic["name"]), ("description", lic.get("attribution")))
                 if v} for lic in licences if lic["kind"] == "dataset"]
    if models:
        override["general.base_models"] = models
    if datasets:
        override["general.datasets"] = datasets
    return card, override


def texts(licences: list[dict[str, Any]]) -> list[str]:
    """Each licence's texts (the Modelfile's LICENSE lines), read from the ancestors' folders."""
    out = []
    for lic in licences:
        root = Path(lic.get("path", ""))
        for rel in lic.get("files", []):
            try:
                out.append((root / rel).read_text(encoding="utf-8", errors="replace"))
            except OSError:
                continue
    return out


def summary(licences: list[dict[str, Any]]) -> list[str]:
    """One line per licence, for `exports show` and the bundle listing."""
    return [f"{lic['role']} {lic['name']}: {lic.get('id', 'unknown')}"
            + (f" - {lic['attribution']}" if lic.get("attribution") else "")
            + (f" ({', '.join(lic['files'])})" if lic.get("files") else "")
            for lic in licences]
