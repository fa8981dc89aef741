"""The soup stage across nodes: two torchrun agents on loopback, meeting at a c10d rendezvous and each souping from its
own copy of the workspace, both end with the files of the process alone; a node whose partner never comes is refused
within its join deadline, and nodes that saved different progress are refused before souping."""

from __future__ import annotations

import socket
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from shutil import copytree

import pytest
import torch
from safetensors.torch import load_file

from soup_pipeline.config import Params
from soup_pipeline.core.ingredients import save_ingredient
from soup_pipeline.core.models import classifier_spec
from soup_pipeline.core.portable_classifier import classifier_from_spec
from soup_pipeline.runtime.errors import SoupError
from soup_pipeline.stages import soup
from soup_pipeline.workspace.paths import StagePaths
from soup_pipeline.workspace.results import read_result

pytestmark = pytest.mark.slow
METHOD = "mehl_soup_plus"
K = 3  # blocks of 2 and 1: each node's rank holds one ingredient of the first block, the second leaves node 1 none
PARAMS = {"data": {"pretrain_size": 0, "train_size": 10, "heldout_size": 40, "heldout_views": 1, "test_size": 10},
          "sweep": {"members": list(range(K))},
          "soup": {"device": "cpu", "batch_size": 16,
                   "methods": {METHOD: {"passes": 0.5, "model_batch": 2, "grouping": "model"}}}}
REFUSED = "the ranks start from different soups: their nodes restored different saved progress"


def params(**soup_keys) -> Params:
    return Params.model_validate({**PARAMS, "soup": {**PARAMS["soup"], **soup_keys}})


def on_nodes(roots: list[Path], join_timeout: int = 120) -> list:
    """The soup stage started at once in each root, as one of two nodes meeting at a free loopback port (one torchrun
    agent each): its result, or the SoupError it raised."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        endpoint = f"127.0.0.1:{probe.getsockname()[1]}"
    given = params(nnodes=2, rdzv_endpoint=endpoint, join_timeout=join_timeout)

    def node(root):
        try:
            return soup.run(given, root, METHOD)
        except SoupError as error:
            return error

    with ThreadPoolExecutor(len(roots)) as pool:
        return list(pool.map(node, roots))


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    """A root holding K fine-tunes of the tiny classifier (seeded perturbations of one random model)."""
    root = tmp_path_factory.mktemp("workspace")
    spec = classifier_spec("soup-tiny-vit", 10)
    torch.manual_seed(0)
    base = classifier_from_spec(spec).state_dict()
    for k in range(K):
        state = {key: value + 0.01 * torch.randn_like(value) if value.is_floating_point() else value
                 for key, value in base.items()}
        save_ingredient(state, StagePaths(root).ingredient(k), meta={"classifier_spec": spec})
    return root


@pytest.fixture(scope="module")
def alone(workspace, tmp_path_factory) -> Path:
    """A copy of the workspace souped by one process (no torchrun): the reference."""
    root = copytree(workspace, tmp_path_factory.mktemp("alone") / "root")
    soup.run(params(), root, METHOD)
    return root


def saved(root: Path) -> Path:
    """The soup's saved progress (its coefficients X among it)."""
    (path,) = (root / "runs" / "resume").rglob("*.safetensors")
    return path


def most_apart(expected: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> float:
    assert set(expected) == set(got)
    return max(float((expected[key] - got[key]).abs().max()) for key in expected)


def test_two_nodes_end_with_the_same_files_and_the_soup_of_one_process(workspace, alone, tmp_path):
    roots = [copytree(workspace, tmp_path / f"node-{n}") for n in (0, 1)]
    results = on_nodes(roots)
    assert not [error for error in results if isinstance(error, Exception)], results
    written = [{path.name: path.read_bytes() for path in [*StagePaths(root).soup_dir(METHOD).iterdir(), saved(root)]}
               for root in roots]
    assert written[0] == written[1] and len(written[0]) == 6  # the soup's 5 files and the progress, bit for bit
    assert saved(roots[0]).relative_to(roots[0]) == saved(alone).relative_to(alone)  # its resume key ignores nodes
    # Not bit for bit the process alone, which sums a block's terms in one product where the ranks sum their own and
    # all-reduce them: equal up to float32 rounding (the classifier's dtype; test_distributed.py's 1e-10 is float64's).
    soups = [load_file(str(StagePaths(root).soup_dir(METHOD) / "soup.safetensors")) for root in (alone, roots[0])]
    assert most_apart(*soups) < 1e-6
    coefficients = [load_file(str(saved(root)))["X"] for root in (alone, roots[0])]
    assert coefficients[0].abs().max() > 1e-3 and most_apart(*({"X": X} for X in coefficients)) < 1e-6
    assert most_apart({"beta": read_result(StagePaths(alone), METHOD).beta}, {"beta": results[0].beta}) < 1e-6


def test_a_node_whose_partner_never_joins_is_refused_within_its_join_timeout(workspace, tmp_path):
    started = time.monotonic()
    (refused,) = on_nodes([copytree(workspace, tmp_path / "root")], join_timeout=5)
    elapsed = time.monotonic() - started
    assert isinstance(refused, SoupError) and 5 <= elapsed < 60, (refused, elapsed)
    assert "not all 2 nodes joined the rendezvous at 127.0.0.1:" in str(refused)
    assert "within join_timeout=5 s (RendezvousTimeoutError). Start `soup-pipeline soup --method" in str(refused)
    assert not StagePaths(tmp_path / "root").soup_dir(METHOD).exists()


def test_nodes_that_saved_different_progress_are_refused_before_souping(workspace, alone, tmp_path, capfd):
    roots = [copytree(alone, tmp_path / "finished"), copytree(workspace, tmp_path / "fresh")]  # only one saved its run
    started = time.monotonic()
    results = on_nodes(roots)
    assert all(isinstance(error, SoupError) for error in results) and time.monotonic() - started < 120, results
    assert REFUSED in capfd.readouterr().err
    assert not StagePaths(roots[1]).soup_dir(METHOD).exists()
