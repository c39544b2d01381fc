"""The training stage: QLoRA/LoRA on one GPU, several (`distributed`) or the CPU.

`config` is the recipe (a typed, validated dataclass), `planner` fits it to the memory there is,
`recipe` is the training loop with its checkpoints, `fastlora` the fused LoRA layer, `runs` the
stored runs; its job is `job.run` (kind `train`)."""
