"""Serve the pipeline as a scheduled Prefect deployment from this process (nightly by default).

    python -m soup_pipeline.prefect.serve --name nightly --cron "0 2 * * *" --params params.yaml --root .

The process polls the Prefect API (PREFECT_API_URL) for scheduled and manual runs of
`soup-pipeline/<name>` and runs each in a subprocess; stop it with SIGTERM or Ctrl-C.
"""

from __future__ import annotations

import argparse
from pathlib import Path

from soup_pipeline.prefect.pipeline import soup_pipeline_flow

NIGHTLY = "0 2 * * *"


def main(argv: list[str] | None = None) -> None:
    """Parse the options and serve the deployment until stopped."""
    parser = argparse.ArgumentParser(prog="python -m soup_pipeline.prefect.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--name", default="nightly", help="deployment name (default: nightly)")
    parser.add_argument("--cron", default=NIGHTLY, help=f"cron schedule (default: {NIGHTLY!r})")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--root", default=".", help="pipeline root, where runs/ is written (default: .)")
    args = parser.parse_args(argv)
    parameters = {"params_path": str(Path(args.params).resolve()), "root": str(Path(args.root).resolve())}
    soup_pipeline_flow.serve(name=args.name, cron=args.cron, parameters=parameters)


if __name__ == "__main__":
    main()
