"""The pipeline's entry points and nothing else: one module per stage the `soup-pipeline` CLI, DVC and the Prefect flow
run, each with its pure `run(...)`: `prepare`, `pretrain`, `finetune`, `importer` (the `import` stage), `soup` (the
`soup` and `refine` stages), `evaluate`, `ablate`, and `export` (`soup-pipeline export`). What they share, the project
folder they work in, is `soup_pipeline.workspace`."""
