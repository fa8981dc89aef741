"""What README.md and docs/method.md name exists: every params key they write in backticks is a key of
params.yaml's model (a method's own keys under `soup.methods.<method>`), every snake_case identifier they name
appears in the package, and every file path they give is in the repository. A rename that leaves the
documentation behind fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from soup_pipeline.config import Params
from soup_pipeline.soups import SPECS

ROOT = Path(__file__).resolve().parents[1]
DOCS = ["README.md", "docs/method.md"]
SECTIONS = set(Params.model_fields)
OTHER_TOOLS = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_HTTP_REQUEST_TIMEOUT", "RLIMIT_FSIZE"}  # MLflow's, the OS's
PLACEHOLDER = re.compile(r"^[<$*]")  # soup.methods.<method>, soup.methods.${key}
PARAMS_KEY = re.compile(r"[a-z_]+(\.[A-Za-z_0-9<>${}*]+)+")
IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*_[A-Za-z0-9_]*(\(\))?")
PATH = re.compile(r"(soup_pipeline|tests|benchmarks|docs|examples|flows)/[\w./-]+")


def named(doc: str) -> list[str]:
    return re.findall(r"`([^`\n]+)`", (ROOT / doc).read_text())


def params_key_exists(key: str) -> bool:
    """`key` (dotted) names a field of Params; under soup.methods / soup.refine the next part is a method (a
    placeholder standing for any of them) and what follows one of its own parameters."""
    return _exists(Params, key.split("."))


def _exists(model: type[BaseModel] | None, parts: list[str]) -> bool:
    if not parts:
        return True
    part, rest = parts[0], parts[1:]
    if PLACEHOLDER.match(part):  # soup.methods.<method>.<key>: any key
        return True
    if model is None or part not in model.model_fields:
        return False
    if part in ("methods", "refine") and model.__name__ == "SoupParams" and rest:
        method, rest = rest[0], rest[1:]
        if PLACEHOLDER.match(method):
            return any(_exists(spec.params, rest) for spec in SPECS.values())
        return method in SPECS and _exists(SPECS[method].params, rest)
    annotation = model.model_fields[part].annotation
    nested = annotation if isinstance(annotation, type) and issubclass(annotation, BaseModel) else None
    return not rest or _exists(nested, rest)


def package_words() -> set[str]:
    text = "\n".join(path.read_text() for pattern in ("*.py", "*.yaml", "*.json")
                     for path in (ROOT / "soup_pipeline").rglob(pattern))
    return set(re.findall(r"[A-Za-z_][A-Za-z0-9_]*", text))


@pytest.mark.parametrize("doc", DOCS)
def test_every_params_key_the_documentation_names_exists(doc):
    keys = {token for token in named(doc) if PARAMS_KEY.fullmatch(token) and token.split(".")[0] in SECTIONS}
    assert keys, "the check found no params key to check"
    assert sorted(key for key in keys if not params_key_exists(key)) == []


@pytest.mark.parametrize("doc", DOCS)
def test_every_identifier_and_path_the_documentation_names_exists(doc):
    words = package_words()
    identifiers = {token.removesuffix("()") for token in named(doc) if IDENTIFIER.fullmatch(token)} - OTHER_TOOLS
    assert sorted(name for name in identifiers if name not in words) == []
    paths = {match.group(0).rstrip(".") for token in named(doc) for match in [PATH.match(token)] if match}
    assert sorted(path for path in paths if not (ROOT / path).exists()) == []


def test_the_checks_catch_a_renamed_key_identifier_and_path():
    assert not params_key_exists("soup.model_epochs") and params_key_exists("soup.methods.mehl_soup.model_epochs")
    assert not params_key_exists("soup.methods.mehl_soupp.passes") and params_key_exists("soup.methods.<method>.lr")
    assert not params_key_exists("soup.methods.<method>.model_epochz")
    assert params_key_exists("soup.methods.mehl_soup_auto.search.lrs") and not params_key_exists("evaluate.basin_gapp")
    assert "project_block" not in package_words() and "hyperplane_soup" in package_words()
