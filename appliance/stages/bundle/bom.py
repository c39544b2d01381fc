"""The bill of materials of a bundle: CycloneDX 1.6 JSON through cyclonedx-python-lib (the
CycloneDX project's own library: a standard any SBOM tool reads, and ML components are in the
spec since 1.5).

Components: each exported model (a machine-learning-model component with its main file's sha256),
its ancestors (the merged model, the run, the base model: models; the datasets: data), and the
Python packages the export was made with (libraries, purl pkg:pypi). Dependencies link each
artifact to its parents. Licences are the ones the manifests carry (SPDX ids where known).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

KINDS = {"export": "machine-learning-model", "model": "machine-learning-model",
         "run": "machine-learning-model", "dataset": "data"}


def _ref(kind: str, name: str) -> str:
    return f"{kind}:{name}"


def _license(lic: Any) -> list[Any]:
    from cyclonedx.model.license import DisjunctiveLicense

    if isinstance(lic, dict) and lic.get("id"):
        try:
            return [DisjunctiveLicense(id=str(lic["id"]))]
        except Exception:  # not an SPDX id the library knows: keep it by name
            return [DisjunctiveLicense(name=str(lic["id"]))]
    if isinstance(lic, dict) and lic.get("name"):
        return [DisjunctiveLicense(name=str(lic["name"]))]
    return []


def _component(kind: str, data: dict[str, Any]) -> Any:
    from cyclonedx.model import HashAlgorithm, HashType, Property
    from cyclonedx.model.bom_ref import BomRef
    from cyclonedx.model.component import Component, ComponentType

    name = str(data.get("name"))
    files = data.get("files", {})
    main = max(files.items(), key=lambda kv: kv[1].get("size", 0), default=None)
    hashes = [HashType(alg=HashAlgorithm.SHA_256, content=main[1]["sha256"])] if main else []
    props = [Property(name="appliance:kind", value=kind),
             Property(name="appliance:manifest_sha256", value=str(data.get("_manifest_sha256", "")))]
    if main:
        props.append(Property(name="appliance:main_file", value=main[0]))
    summary = data.get("info", {}).get("summary", {})
    for key in ("format", "type", "architecture", "parameters", "parity"):
        if summary.get(key) is not None:
            props.append(Property(name=f"appliance:{key}", value=str(summary[key])))
    ctype = ComponentType.DATA if KINDS.get(kind) == "data" else ComponentType.MACHINE_LEARNING_MODEL
    info = data.get("info", {})
    own = info.get("license") or next(  # what was made from a model carries its base's licence
        (lic for lic in info.get("licenses") or [] if lic.get("role") == "base model"), None)
    return Component(type=ctype, name=name, version=str(data.get("created", "")),
                     bom_ref=BomRef(_ref(kind, name)), hashes=hashes, properties=props,
                     licenses=_license(own))


def build(artifacts: Iterable[dict[str, Any]], lineage: Iterable[dict[str, Any]],
          versions: dict[str, str], tool_version: str) -> str:
    """The BOM as CycloneDX 1.6 JSON text. Each manifest dict may carry `_manifest_sha256`."""
    from cyclonedx.model.bom import Bom
    from cyclonedx.model.bom_ref import BomRef
    from cyclonedx.model.component import Component, ComponentType
    from cyclonedx.output.json import JsonV1Dot6
    from packageurl import PackageURL

    bom = Bom()
    made: dict[str, Any] = {}
    manifests = [*artifacts, *lineage]
    for data in manifests:
        comp = _component(str(data.get("kind")), data)
        made[_ref(str(data.get("kind")), str(data.get("name")))] = comp
        bom.components.add(comp)
    libs = []
    for pkg, version in sorted(versions.items()):
        if not version:
            continue
        lib = Component(type=ComponentType.LIBRARY, name=pkg, version=str(version),
                        bom_ref=BomRef(f"pypi:{pkg}@{version}"),
                        purl=PackageURL(type="pypi", name=pkg.lower(), version=str(version)))
        libs.append(lib)
        bom.components.add(lib)
    tool = Component(type=ComponentType.APPLICATION, name="appliance", version=tool_version,
                     bom_ref=BomRef(f"appliance@{tool_version}"))
    bom.metadata.tools.components.add(tool)
    for data in manifests:
        comp = made[_ref(str(data.get("kind")), str(data.get("name")))]
        parents = [made[r] for p in data.get("parents", [])
                   if (r := _ref(str(p.get("kind")), str(p.get("name")))) in made]
        if data in artifacts:
            parents = [*parents, *libs]
        if parents:
            bom.register_dependency(comp, parents)
    return str(JsonV1Dot6(bom).output_as_string(indent=2))
