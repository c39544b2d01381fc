"""The data import stage: a JSONL file checked, deduplicated and measured for a model with its
report (`importer`). It runs in the caller's process (the TUI's worker, the CLI), not as a job."""
