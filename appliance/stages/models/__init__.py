"""The model import stage: a local HF folder (safetensors), a GGUF file or the embedded default,
checked and copied into the workspace (`importer`); its job is `job.run` (kind `import-model`)."""
