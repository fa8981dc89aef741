"""`soup-pipeline`: one subcommand per DVC stage, `run` for the whole pipeline, and the registry."""

from __future__ import annotations

import argparse
import atexit
import json
import os
import sys
import warnings
from pathlib import Path

from .config import Params, load_params, soup_methods
from .runtime.errors import SoupError
from .runtime.lock import LOCK_HELD_ENV, root_lock

OFFLINE_DEFAULTS = {"MLFLOW_DISABLE_TELEMETRY": "true", "DO_NOT_TRACK": "true",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DVC_NO_ANALYTICS": "1"}
MODULES_RECORD_ENV = "SOUP_PIPELINE_RECORD_MODULES"  # a folder: each command writes the package modules it loaded there


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="soup-pipeline", description="Learn a model soup from a fine-tuning sweep.")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    parser.add_argument("--root", default=".", help="pipeline root; outputs go under ROOT/runs (default: .)")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("prepare", help="check the data splits and write their manifest")
    commands.add_parser("pretrain", help="pre-train the base model (embedded default) and measure zero-shot accuracy")
    finetune = commands.add_parser("finetune", help="fine-tune one sweep member into an ingredient")
    finetune.add_argument("--member", type=int, required=True)
    soup = commands.add_parser("soup", help="build one soup")
    soup.add_argument("--method", required=True, choices=soup_methods(refining=False),
                      help="the soup to build (the ensemble is not a soup: `evaluate` reports it)")
    refine = commands.add_parser("refine", help="build one soup on a built soup (params soup.refine)")
    refine.add_argument("--method", required=True, choices=soup_methods(refining=True),
                        help="the refinement to build, e.g. wise_ft_soup (its `soup` parameter names the soup)")
    imported = commands.add_parser("import", help="make external checkpoints members under runs/imported/ (no pickle): "
                                                  "those of params `imports` (the DVC stage), or the --source given")
    imported.add_argument("--source", action="append", default=None,
                          help="a .safetensors or .pt/.pth file, a folder or glob of them, runs:/<run_id>/<path>, "
                               "models:/<name>/<version>, models:/<name>@<alias> or "
                               "experiment:<name>/<path>[?metric=<key>[&top=N][&order=asc]]; repeat for more")
    imported.add_argument("--member", type=int, default=None, help="member id of the first --source checkpoint; "
                          "the next ones follow (default: imports.first_member)")
    imported.add_argument("--strip-prefix", default="", help="with --source: removed from every key, e.g. 'module.'")
    commands.add_parser("evaluate", help="compare every method on held-out, test and shifted test data")
    commands.add_parser("ablate", help="accuracy against the number of ingredients, and after removing the best")
    commands.add_parser("run", help="the whole pipeline as a Prefect flow, tracked in MLflow")
    init = commands.add_parser("init", help="scaffold the pipeline (params.yaml, dvc.yaml, prefect.yaml, DVC with a "
                                            "local remote) into a git repository; never overwrites a file")
    init.add_argument("dir", nargs="?", default=".", help="the repository (created when missing; default: .)")
    init.add_argument("--remote", default=None, help="the DVC remote folder (default: DIR/../<name>-dvc-remote)")
    commands.add_parser("code-digests", help="write ROOT/.soup-pipeline/code/<stage>.sha256, the digest of the code "
                                             "each stage runs (the `code` stage of a scaffolded dvc.yaml)")
    commands.add_parser("track", help="log a finished pipeline to MLflow from its files, recomputing nothing "
                                      "(after the tracking server was lost mid-run)")
    export = commands.add_parser("export", help="write a soup as an open_clip model folder (zero-shot with any class "
                                                "names) and as a classifier that plain torch + open_clip load")
    export.add_argument("source", help="models:/NAME/VERSION or models:/NAME@ALIAS (MLFLOW_TRACKING_URI, else "
                                       "ROOT/mlflow.db), or a soup of the pipeline root: runs/soups/<method>")
    export.add_argument("--out", required=True, help="the folder to write open_clip/ and classifier/ into")
    export.add_argument("--base", default=None, help="weights of the pre-trained CLIP the fine-tunes started from "
                                                     "(default: the pipeline root's base)")
    registry = commands.add_parser("registry", help="the MLflow model registry")
    registry.add_argument("action", choices=["compare"])
    registry.add_argument("--name", default=None, help="registered model (default: tracking.registered_model)")
    return parser


PACKAGE_DIR = str(Path(__file__).resolve().parent)
_default_showwarning = warnings.showwarning


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """The package's own warnings as one line for the user; other libraries' keep their source line."""
    if str(Path(filename).resolve()).startswith(PACKAGE_DIR):
        print(f"soup-pipeline: warning: {message}", file=file or sys.stderr)
    else:
        _default_showwarning(message, category, filename, lineno, file, line)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `soup-pipeline` command."""
    for key, value in OFFLINE_DEFAULTS.items():
        os.environ.setdefault(key, value)
    warnings.showwarning = _show_warning
    args = _parser().parse_args(argv)
    if os.environ.get(MODULES_RECORD_ENV):
        atexit.register(_record_modules, Path(os.environ[MODULES_RECORD_ENV]), args.command)
    try:
        print(_locked_dispatch(args))
    except SoupError as exc:
        print(f"soup-pipeline: error: {exc}", file=sys.stderr)
        return 2
    return 0


def _record_modules(folder: Path, command: str) -> None:
    """At exit: write FOLDER/<command>-<pid>.json, the names of this package's modules the process loaded (the test of
    dvc.yaml's code deps compares them with the deps the stage declares)."""
    loaded = sorted(name for name in sys.modules if name == __package__ or name.startswith(__package__ + "."))
    folder.mkdir(parents=True, exist_ok=True)
    (folder / f"{command}-{os.getpid()}.json").write_text(json.dumps({"command": command, "argv": sys.argv[1:],
                                                                      "modules": loaded}))


def _locked_dispatch(args: argparse.Namespace) -> str:
    """Run a command; one that writes under the root holds its lock (the `run` flow takes it itself; the
    processes a command launches under its lock, and torchrun's ranks but rank 0, do not take it again)."""
    launched_rank = int(os.environ.get("RANK", "0"))  # torchrun's: rank 0 holds the lock for its group
    unlocked = ("run", "registry", "init", "code-digests", "export")  # export writes only under its --out
    if args.command in unlocked or os.environ.get(LOCK_HELD_ENV) or launched_rank > 0:
        return _dispatch(args)

    with root_lock(args.root, args.command):
        return _dispatch(args)


def _dispatch(args: argparse.Namespace) -> str:
    """Each command imports only what it runs, so a stage's code is its own import closure (`stage_code`)."""
    if args.command == "init":
        from .workspace.scaffold import init

        return init(Path(args.dir), Path(args.remote) if args.remote else None)
    if args.command == "code-digests":
        from .workspace.code import write_code_digests

        return f"code digests: {len(write_code_digests(Path(args.root)))} changed"
    if args.command == "export":  # a registered version exports without a params file
        return _export(load_params(args.params) if Path(args.params).is_file() else None, Path(args.root), args)
    params = load_params(args.params)
    root = Path(args.root)
    return COMMANDS[args.command](params, root, args)


def _prepare(params: Params, root: Path, args: argparse.Namespace) -> str:
    from .stages import prepare

    return f"splits: { {k: v['size'] for k, v in prepare.run(params, root)['splits'].items()} }"


def _pretrain(params: Params, root: Path, args: argparse.Namespace) -> str:
    from .stages import pretrain

    return f"zero-shot accuracy: {pretrain.run(params, root)['zero_shot']}"


def _finetune(params: Params, root: Path, args: argparse.Namespace) -> str:
    from .stages import finetune

    ingredient = finetune.run(params, root, args.member)
    return (f"{ingredient.path}: fit accuracy {ingredient.fit_acc:.4f}, "
            f"select accuracy {ingredient.meta['select_acc']:.4f}")


def _soup(params: Params, root: Path, args: argparse.Namespace) -> str:
    from .stages import soup

    result = soup.run(params, root, args.method)
    return f"{args.method}: built in {result.seconds:.1f} s"


def _refine(params: Params, root: Path, args: argparse.Namespace) -> str:
    from .stages import soup

    result = soup.run(params, root, args.method)
    return f"{args.method} of {params.soup.method(args.method).soup}: built in {result.seconds:.1f} s"


def _import(params: Params, root: Path, args: argparse.Namespace) -> str:
    from .stages import importer
    from .tracking import tracking_uri
    from .tracking.mlflow_sources import mlflow_sources

    remote = mlflow_sources(tracking_uri(root))  # MLflow sources are read through the tracking glue
    if args.source is None:
        ingredients = importer.run_params(params, root, remote=remote)
    else:
        first = params.imports.first_member if args.member is None else args.member
        ingredients = importer.run_many(params, root, args.source, first_member=first, strip_prefix=args.strip_prefix,
                                        base_model=importer.pipeline_base(params, root), remote=remote)
    return "\n".join(f"member {i.meta['member']} <- {i.meta['source_uri']}: {i.path}, fit accuracy {i.fit_acc:.4f}, "
                     f"select accuracy {i.meta['select_acc']:.4f}" for i in ingredients) or "no checkpoints to import"


def _evaluate(params: Params, root: Path, args: argparse.Namespace) -> str:
    from .evaluation.tables import markdown_table
    from .stages import evaluate

    return markdown_table(evaluate.run(params, root), evaluate.TABLE_COLUMNS)


def _ablate(params: Params, root: Path, args: argparse.Namespace) -> str:
    from .stages import ablate
    from .workspace.paths import StagePaths

    ablate.run(params, root)
    return (StagePaths(root).ablation_dir / "ablation.md").read_text()


def _run(params: Params, root: Path, args: argparse.Namespace) -> str:
    from .evaluation.tables import markdown_table
    from .prefect.pipeline import soup_pipeline_flow
    from .stages.evaluate import TABLE_COLUMNS

    summary = soup_pipeline_flow(params_path=args.params, root=str(root))
    if summary["tracking_missed"]:
        print(f"soup-pipeline: warning: MLflow failed mid-run; not logged: {', '.join(summary['tracking_missed'])}. "
              "Run `soup-pipeline track` once the tracking server is back", file=sys.stderr)
    return markdown_table(summary["rows"], TABLE_COLUMNS)


def _track(params: Params, root: Path, args: argparse.Namespace) -> str:
    from .tracking.stage_runs import replay

    if not params.tracking.enabled:
        raise SoupError(f"tracking.enabled is false in {args.params}; set it to true to log the pipeline")
    summary = replay(params, root)
    if summary["missed"]:
        raise SoupError(f"MLflow failed again; not logged: {', '.join(summary['missed'])}. Rerun `soup-pipeline track`")
    return (f"logged {root.resolve()} as MLflow run {summary['mlflow_run_id']}; "
            f"registered version {summary['registered_version']}")


def _export(params: Params | None, root: Path, args: argparse.Namespace) -> str:
    import tempfile

    from .stages import export

    if args.source.startswith("models:/"):
        from .tracking import tracking_uri
        from .tracking.export import registered_classifier

        with tempfile.TemporaryDirectory() as download:
            state, spec = registered_classifier(args.source, tracking_uri(root), Path(download))
    else:
        state, spec = export.soup_model(params or load_params(args.params), root, args.source)
    folders = export.run(state, spec, args.out, base=args.base, params=params, root=root)
    return "\n".join(f"{name}: {folder}" for name, folder in folders.items())


def _registry(params: Params, root: Path, args: argparse.Namespace) -> str:
    from .tracking import registry_compare_main, tracking_uri

    return registry_compare_main(args.name or params.tracking.registered_model, tracking_uri(root))


COMMANDS = {"prepare": _prepare, "pretrain": _pretrain, "finetune": _finetune, "soup": _soup, "refine": _refine,
            "import": _import, "evaluate": _evaluate, "ablate": _ablate, "run": _run, "track": _track,
            "registry": _registry}


if __name__ == "__main__":
    sys.exit(main())
