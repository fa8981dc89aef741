"""`soup-pipeline init [DIR]`: a pipeline scaffolded into an existing or new git repository.

Writes the commented params.yaml, dvc.yaml (each stage depending on the digest of the installed code it
runs), prefect.yaml with its thin flow entry point, and the .gitignore lines the pipeline needs; initialises
git and DVC where they are missing and adds a local DVC remote. An existing file is never overwritten: the
report says what was skipped.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from ..runtime.errors import SoupError
from .code import write_code_digests

TEMPLATES = Path(__file__).resolve().parent.parent / "templates"
# written in the project -> its template (none is named dvc.yaml in the package: DVC would take it for a pipeline)
FILES = {"params.yaml": "params.yaml", "dvc.yaml": "dvc-stages.yaml", "prefect.yaml": "prefect.yaml",
         "flows/pipeline.py": "flow_entry.py"}
IGNORED = ["/runs/resume/", "/runs/costs/", "/runs/.lock", "mlflow.db", "/mlruns/", "/mlartifacts/", "/.prefect/"]


def _run(args: list[str], cwd: Path) -> None:
    done = subprocess.run(args, cwd=cwd, capture_output=True, text=True)
    if done.returncode != 0:
        raise SoupError(f"`{' '.join(args)}` failed in {cwd}: {done.stderr.strip()[-1000:]}")


def _dvc(*args: str) -> list[str]:
    return [sys.executable, "-m", "dvc", *args]


def init(folder: Path, remote: Path | None = None) -> str:
    """Scaffold the pipeline into `folder` (created when missing); return the report of what was done and skipped."""
    folder = folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    done, skipped = [], []
    if not (folder / ".git").exists():
        _run(["git", "init", "-q"], folder)
        done.append("git init")
    for target, template in FILES.items():
        path = folder / target
        if path.exists():
            skipped.append(f"{target} (exists)")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(TEMPLATES / template, path)
        done.append(target)
    ignore = folder / ".gitignore"
    present = ignore.read_text().splitlines() if ignore.is_file() else []
    missing = [line for line in IGNORED if line not in present]
    if missing:
        with ignore.open("a") as out:
            out.write(("\n" if present and present[-1] else "") + "# soup-pipeline\n" + "\n".join(missing) + "\n")
        done.append(f".gitignore (+{len(missing)} lines)")
    if not (folder / ".dvc").is_dir():
        _run(_dvc("init", "-q"), folder)
        _run(_dvc("config", "core.analytics", "false"), folder)
        done.append("dvc init")
    else:
        skipped.append("dvc init (.dvc exists)")
    listed = subprocess.run(_dvc("remote", "list"), cwd=folder, capture_output=True, text=True).stdout
    if listed.strip():
        skipped.append("DVC remote (one is configured)")
    else:
        remote = (remote or folder.parent / f"{folder.name}-dvc-remote").resolve()
        _run(_dvc("remote", "add", "-d", "local", str(remote)), folder)
        done.append(f"DVC remote 'local' -> {remote}")
    write_code_digests(folder)
    lines = [f"scaffolded a soup pipeline in {folder}", *(f"  wrote: {item}" for item in done),
             *(f"  skipped: {item}" for item in skipped),
             "next: edit params.yaml, then `git add -A && git commit`, and `dvc repro` or `soup-pipeline run`"]
    return "\n".join(lines)
