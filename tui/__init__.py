"""The operator's terminal UI (Textual), a thin layer over the headless core in `appliance/`.

It never imports torch/transformers at module scope: screens call the core from worker threads.
"""
