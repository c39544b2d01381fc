"""appliance: an offline adaptation-and-deployment appliance for LLMs.

The headless core. It never imports Textual, and it imports the heavy ML stack (torch,
transformers, ...) only inside the functions that need it, so the CLI starts fast.
"""

__version__ = "0.1.0"
