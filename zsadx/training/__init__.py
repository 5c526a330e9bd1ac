"""Training of prompts and adapters: config, loop, checkpoints."""
