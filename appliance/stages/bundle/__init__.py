"""Bundles: carry exports across the air gap, signed, with their lineage, licences, a bill of
materials and the audit lines that made them.

A bundle is one uncompressed POSIX tar (GGUF and ONNX weights do not compress; a plain tar streams
in both directions and any tool can list it), its members in this order:

    bundle.json                 the signed document: the artifacts (kind, name, manifest sha256),
                                every other member's size and sha256, lineage, licences, versions
    bundle.sig                  64-byte Ed25519 signature of bundle.json (absent if unsigned)
    signer.pub                  the signer's public key (PEM)
    bom.cdx.json                CycloneDX 1.6 ML-BOM: the models, their base, datasets, software
    audit.jsonl                 the audit lines of the artifacts' lineage, as written
    lineage/KIND/NAME.json      the manifest of every ancestor (run, merged model, base model, data)
    artifacts/KIND/NAME/...     each artifact's files, its manifest.json byte for byte

`create` (appliance/stages/bundle/create.py) checks every artifact against its manifest first and
hashes again while writing. `reader.read` checks a bundle as it streams: the signature and the
signer's trust before any file is read, then each member (a regular file, a safe relative path,
listed, of the listed size and sha256), then that nothing listed is missing. `importer` stages
what it reads and renames it into place only when every check passed. No whole-file reads.
"""
