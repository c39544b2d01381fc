"""What a bundle job is asked to do: `BundleCreateRequest` (exports -> a signed file) and
`BundleImportRequest` (a file -> this workspace). Only the standard library and the core."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

from appliance.workspace import name_problem

SUFFIX = ".bundle"  # the default file name: EXPORT.bundle


@dataclass(frozen=True)
class BundleCreateRequest:
    """`exports`: export names; `output`: the bundle file (absolute; default NAME.bundle in the
    current folder); `key`: signing key name (default key if None); `unsigned`: no signature."""

    exports: tuple[str, ...] = field(default_factory=tuple)
    output: str = ""
    key: str | None = None
    unsigned: bool = False
    name: str | None = None

    kind: ClassVar[str] = "bundle-create"

    @classmethod
    def make(cls, exports: list[str], output: str | None = None, key: str | None = None,
             unsigned: bool = False, name: str | None = None) -> BundleCreateRequest:
        bundle = name or (exports[0] if exports else "bundle")
        out = Path(output) if output else Path.cwd() / f"{bundle}{SUFFIX}"
        return cls(tuple(exports), str(out.expanduser().resolve()), key, unsigned, name)

    def bundle_name(self) -> str:
        return self.name or (self.exports[0] if self.exports else "bundle")

    def problems(self) -> dict[str, str]:
        found: dict[str, str] = {}
        if not self.exports:
            found["exports"] = "name at least one export (appliance exports list)"
        for name in self.exports:
            if why := name_problem(name, "export name"):
                found["exports"] = why
        if self.name and (why := name_problem(self.name, "bundle name")):
            found["name"] = why
        out = Path(self.output) if self.output else None
        if out is None or not out.parent.is_dir():
            found["output"] = f"{out.parent if out else '(none)'} is not a folder"
        elif out.exists():
            found["output"] = f"{out} exists; pick another -o or remove it"
        return found

    def to_params(self) -> dict[str, Any]:
        return {"exports": list(self.exports), "output": self.output, "key": self.key,
                "unsigned": self.unsigned, "name": self.name}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> BundleCreateRequest:
        return cls(tuple(str(e) for e in params.get("exports") or ()), str(params.get("output") or ""),
                   params.get("key") or None, bool(params.get("unsigned")), params.get("name") or None)


@dataclass(frozen=True)
class BundleImportRequest:
    """`path`: the bundle file (absolute); `allow_unsigned`: accept an unsigned or untrusted one."""

    path: str = ""
    allow_unsigned: bool = False

    kind: ClassVar[str] = "bundle-import"

    @classmethod
    def make(cls, path: str, allow_unsigned: bool = False) -> BundleImportRequest:
        return cls(str(Path(path).expanduser().resolve()), allow_unsigned)

    def problems(self) -> dict[str, str]:
        if not self.path or not Path(self.path).is_file():
            return {"path": f"{self.path or '(none)'} is not a file"}
        return {}

    def to_params(self) -> dict[str, Any]:
        return {"path": self.path, "allow_unsigned": self.allow_unsigned}

    @classmethod
    def from_params(cls, params: Mapping[str, Any]) -> BundleImportRequest:
        return cls(str(params.get("path") or ""), bool(params.get("allow_unsigned")))
