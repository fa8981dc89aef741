"""What the documentation (README.md and every page of docs/) names exists: every params key it writes in
backticks is a key of params.yaml's model (a method's own keys under `soup.methods.<method>`), every snake_case
identifier it names appears in the package, every file path it gives is in the repository, and every link between
its pages leads to a page and a heading that exist. The README links every page, and CI runs exactly its test
command. A rename that leaves the documentation behind fails here."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from doc_pages import PAGES, headings, section
from soup_pipeline.config import Params
from soup_pipeline.soups import SPECS

ROOT = Path(__file__).resolve().parents[1]
DOCS = [str(page.relative_to(ROOT)) for page in PAGES]
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


def params_keys(doc: str) -> set[str]:
    return {token for token in named(doc) if PARAMS_KEY.fullmatch(token) and token.split(".")[0] in SECTIONS}


@pytest.mark.parametrize("doc", DOCS)
def test_every_params_key_the_documentation_names_exists(doc):
    assert sorted(key for key in params_keys(doc) if not params_key_exists(key)) == []


def test_the_key_check_finds_keys_to_check():  # pages such as failures.md name no key; these must
    assert {"README.md", "docs/method.md", "docs/pipeline.md"} <= {doc for doc in DOCS if params_keys(doc)}


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


def anchor(title: str) -> str:
    """The anchor GitHub gives a heading: lower case, punctuation dropped, spaces as hyphens."""
    return re.sub(r"[^\w\- ]", "", title.lower()).replace(" ", "-")


def links(page: Path) -> list[str]:
    """The relative link targets of a page, outside code."""
    text = re.sub(r"```.*?```|`[^`\n]*`", "", page.read_text(), flags=re.S)
    return [target for target in re.findall(r"\]\(([^)\s]+)\)", text) if not re.match(r"[a-z]+:", target)]


@pytest.mark.parametrize("doc", DOCS)
def test_every_link_leads_to_a_page_and_heading_that_exist(doc):
    page = ROOT / doc
    broken = []
    for target in links(page):
        path, _, fragment = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.is_file() or fragment and fragment not in {anchor(title) for _, _, title in
                                                                   headings(linked.read_text())}:
            broken.append(target)
    assert broken == []


def test_the_readme_links_every_docs_page_and_ci_runs_its_test_command():
    linked = {(ROOT / target.partition("#")[0]).resolve() for target in links(ROOT / "README.md")}
    assert [str(page.relative_to(ROOT)) for page in PAGES[1:] if page not in linked] == []
    commands = re.findall(r"^    (\S.*)$", section("The two commands"), re.M)
    test_command = next(command for command in commands if "pytest" in command)
    assert (ROOT / ".ci" / "run").read_text().strip().splitlines()[-1] == test_command


def test_the_link_check_reads_anchors_as_github_makes_them_and_finds_the_links():
    assert anchor("Choosing honestly: fit, select and test data") == "choosing-honestly-fit-select-and-test-data"
    assert anchor("Export to open_clip and plain torch") == "export-to-open_clip-and-plain-torch"
    assert links(ROOT / "README.md") and "docs/results.md" in links(ROOT / "README.md")
