"""One entry point per DVC stage: a pure `run(params, root, ...)` plus the CLI that calls it."""
