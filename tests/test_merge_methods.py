"""The merge methods against direct implementations of their formulas, all ingredients at once, in float64."""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from soup_pipeline.core.ingredients import IngredientStore, save_ingredient
from soup_pipeline.runtime.errors import SoupError
from soup_pipeline.soups import SPECS, Objective, get_spec, method_params, run_method
from soup_pipeline.soups.engine.layers import group_layers
from soup_pipeline.soups.methods.dare import DareParams, DareTiesParams, dare, dare_ties
from soup_pipeline.soups.methods.model_stock import ModelStockParams, model_stock
from soup_pipeline.soups.methods.task_arithmetic import TaskArithmeticParams, task_arithmetic
from soup_pipeline.soups.methods.ties import TiesParams, ties
from soup_pipeline.soups.methods.wise_ft import WiseFTParams, WiseFTSoupParams, wise_ft, wise_ft_soup
from tensor_bytes import LiveTensorBytes
from test_soup_search import Counted
from toys import Blocks, Deep, Toy, toy_data, toy_ingredients

MERGES = ["task_arithmetic", "ties", "dare", "dare_ties", "model_stock", "wise_ft", "wise_ft_soup"]


def anchor_of(model=Toy, seed: int = 0) -> dict[str, torch.Tensor]:
    """theta_0 of `toy_ingredients(..., seed=seed, model=model)`: the random model they perturb."""
    torch.manual_seed(seed)
    return model(torch.float64).state_dict()


def objective(model=Toy) -> Objective:
    return Objective(model_factory=lambda: model(torch.float64), fit=toy_data(80), select=toy_data(80, seed=1),
                     batch_size=40)


def options(name: str, store: IngredientStore, anchor) -> dict:
    """What method `name` is given beside the ingredients: theta_0, and for a refinement the soup it refines."""
    if not get_spec(name).refines:
        return {"anchor": anchor}
    same_files = IngredientStore([ingredient.path for ingredient in store.ingredients])  # store's counters untouched
    return {"anchor": anchor,
            "soup": run_method("mehl_soup", same_files, objective(), method_params("mehl_soup", passes=1.0))}


def stacked(store: IngredientStore) -> dict[str, torch.Tensor]:
    return {key: torch.stack([store.load(k)[key] for k in range(len(store))]) for key in store.keys}


def floating(anchor):
    return [key for key, value in anchor.items() if value.is_floating_point()]


def assert_states_close(got, expected):
    assert got.keys() == expected.keys()
    for key in expected:
        assert got[key].dtype == expected[key].dtype, key
        torch.testing.assert_close(got[key], expected[key], rtol=1e-12, atol=1e-12, msg=key)


def reference_trim(tau: torch.Tensor, density: float) -> torch.Tensor:
    """Keep the entries at least as large in magnitude as the ceil(density * n)-th largest."""
    magnitudes = tau.abs().flatten().sort(descending=True).values
    threshold = magnitudes[math.ceil(density * tau.numel()) - 1]
    return tau * (tau.abs() >= threshold)


def reference_disjoint_mean(taus: torch.Tensor) -> torch.Tensor:
    """[K, ...] pruned task vectors -> per entry, the mean of those whose sign is the sign of the sum."""
    elected = taus.sum(0).sign()
    agree = (taus.sign() == elected) & (taus != 0)
    return (taus * agree).sum(0) / agree.sum(0).clamp(min=1)


def reference_ties(store, anchor, scale, density):
    every = stacked(store)
    out = dict(anchor)
    for key in floating(anchor):
        taus = torch.stack([reference_trim(t, density) for t in every[key] - anchor[key]])
        out[key] = anchor[key] + scale * reference_disjoint_mean(taus)
    return out


def reference_model_stock(store, anchor, grouping):
    every = stacked(store)
    keys = floating(anchor)
    K = len(store)
    groups = group_layers(keys, grouping)
    out = dict(anchor)
    for group in range(groups.size):
        members = [key for key in keys if groups.group_of[key] == group]
        vectors = torch.cat([(every[key] - anchor[key]).reshape(K, -1) for key in members], dim=1)
        cosines = [0.0 if min(vectors[i].norm(), vectors[j].norm()) == 0
                   else float(vectors[i] @ vectors[j] / (vectors[i].norm() * vectors[j].norm()))
                   for i, j in itertools.combinations(range(K), 2)]
        cos = min(max(sum(cosines) / len(cosines), 0.0), 1.0)
        t = K * cos / (1 + (K - 1) * cos)
        for key in members:
            out[key] = t * every[key].mean(0) + (1 - t) * anchor[key]
    return out


@pytest.fixture
def toys(tmp_path):
    return toy_ingredients(tmp_path, 4, spread=0.3), anchor_of()


@pytest.mark.parametrize("scale", [0.1, 0.7])
def test_task_arithmetic_adds_scale_times_the_summed_task_vectors(toys, scale):
    store, anchor = toys
    every = stacked(store)
    expected = {key: anchor[key] + scale * (every[key] - anchor[key]).sum(0) if key in floating(anchor) else anchor[key]
                for key in anchor}
    got = task_arithmetic(store, objective(), TaskArithmeticParams(scale=scale), anchor=anchor).state_dict
    assert_states_close(got, expected)


@pytest.mark.parametrize("scale, density", [(1.0, 0.2), (0.6, 0.5), (1.3, 1.0)])
def test_ties_trims_per_tensor_elects_signs_and_averages_the_agreeing_entries(toys, scale, density):
    store, anchor = toys
    got = ties(store, objective(), TiesParams(scale=scale, density=density), anchor=anchor).state_dict
    assert_states_close(got, reference_ties(store, anchor, scale, density))


def shifted_ingredients(folder, anchor, deltas) -> IngredientStore:
    """Ingredients theta_0 + delta_k (deltas: one dict of floating tensors per ingredient; absent keys stay theta_0)."""
    paths = [save_ingredient({key: (value + delta.get(key, torch.zeros_like(value)) if value.is_floating_point()
                                    else value)
                              for key, value in anchor.items()}, folder / f"shifted{k}.safetensors",
                             meta={"fit_acc": 0.5})
             for k, delta in enumerate(deltas)]
    return IngredientStore(paths)


def test_with_every_sign_agreeing_ties_at_density_one_is_task_arithmetic_of_the_mean(tmp_path):
    anchor = anchor_of()
    keys = floating(anchor)
    torch.manual_seed(3)
    deltas = [{key: torch.rand_like(anchor[key]) + 0.1 for key in keys} for _ in range(3)]  # every entry positive
    store = shifted_ingredients(tmp_path, anchor, deltas)
    got = ties(store, objective(), TiesParams(scale=0.9, density=1.0), anchor=anchor).state_dict
    expected = task_arithmetic(store, objective(), TaskArithmeticParams(scale=0.9 / 3), anchor=anchor).state_dict
    assert_states_close(got, expected)


def test_a_tensor_no_ingredient_moved_stays_theta_0_in_every_method(tmp_path):
    anchor = anchor_of()
    still = "net.0.bias"
    torch.manual_seed(4)
    deltas = [{key: 0.2 * torch.randn_like(anchor[key]) for key in floating(anchor) if key != still} for _ in range(3)]
    store = shifted_ingredients(tmp_path, anchor, deltas)
    for name in MERGES:
        spec = get_spec(name)
        result = spec.run(store, objective(), method_params(name, grouping="tensor") if name == "model_stock"
                          else spec.params(), **options(name, store, anchor), name=name)
        assert torch.equal(result.state_dict[still], anchor[still]), name  # no 0/0, no NaN
        assert all(torch.isfinite(value).all() for value in result.state_dict.values() if value.is_floating_point())


def test_dare_at_p_0_is_task_arithmetic_and_dare_ties_at_p_0_is_ties_at_density_1(toys):
    store, anchor = toys
    assert_states_close(dare(store, objective(), DareParams(scale=0.4, drop=0.0), anchor=anchor).state_dict,
                        task_arithmetic(store, objective(), TaskArithmeticParams(scale=0.4), anchor=anchor).state_dict)
    assert_states_close(dare_ties(store, objective(), DareTiesParams(scale=1.2, drop=0.0), anchor=anchor).state_dict,
                        reference_ties(store, anchor, 1.2, 1.0))


def test_dare_keeps_each_entry_whole_and_rescaled_or_drops_it_at_rate_p_with_seeded_masks(tmp_path):
    store, anchor = toy_ingredients(tmp_path, 1, spread=0.3), anchor_of()  # K = 1: the sum is the one dropped vector
    tau = {key: stacked(store)[key][0] - anchor[key] for key in floating(anchor)}
    p = 0.6
    got = dare(store, objective(), DareParams(scale=1.0, drop=p, seed=5), anchor=anchor).state_dict
    kept = total = 0
    for key, value in tau.items():
        delta = got[key] - anchor[key]
        is_kept = torch.isclose(delta, value / (1 - p), rtol=1e-12, atol=1e-15)
        assert (is_kept | (delta == 0)).all(), key  # whole and rescaled, or dropped
        kept, total = kept + int(is_kept.sum()), total + value.numel()
    assert abs(kept / total - (1 - p)) < 4 * math.sqrt(p * (1 - p) / total)  # at rate p
    again = dare(store, objective(), DareParams(scale=1.0, drop=p, seed=5), anchor=anchor).state_dict
    other = dare(store, objective(), DareParams(scale=1.0, drop=p, seed=6), anchor=anchor).state_dict
    assert all(torch.equal(got[key], again[key]) for key in got)
    assert any(not torch.equal(got[key], other[key]) for key in tau)


def reference_dropped(store, anchor, p: float, seed: int) -> dict[str, torch.Tensor]:
    """[K, ...] task vectors per floating key, dropped and rescaled with the masks dare.py's docstring documents:
    ingredient k's generator is seeded with seed * 1_000_003 + k and draws one float64 uniform per entry of each
    floating tensor in turn, in sorted key order; an entry is kept, divided by 1 - p, where its draw is >= p."""
    every = stacked(store)
    keys = sorted(floating(anchor))
    masks = []
    for k in range(len(store)):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + k)
        masks.append({key: torch.rand(anchor[key].shape, generator=generator, dtype=torch.float64) >= p
                      for key in keys})
    return {key: torch.stack([(every[key][k] - anchor[key]) * masks[k][key] / (1 - p) for k in range(len(store))])
            for key in keys}


@pytest.mark.parametrize("p, seed", [(0.3, 0), (0.7, 11)])
def test_dare_and_dare_ties_with_p_above_0_and_several_ingredients_match_the_documented_masks(toys, p, seed):
    store, anchor = toys  # K = 4, tiny tensors
    dropped = reference_dropped(store, anchor, p, seed)
    kept = torch.stack([torch.cat([(dropped[key][k] != 0).flatten() for key in dropped]) for k in range(len(store))])
    assert len({tuple(row.tolist()) for row in kept}) == len(store)  # a mask of its own for each ingredient
    assert abs(kept.double().mean() - (1 - p)) < 0.1  # about 1 - p of the entries kept
    expected = {key: anchor[key] + 0.8 * dropped[key].sum(0) if key in dropped else anchor[key] for key in anchor}
    assert_states_close(dare(store, objective(), DareParams(scale=0.8, drop=p, seed=seed), anchor=anchor).state_dict,
                        expected)
    expected = {key: anchor[key] + 1.2 * reference_disjoint_mean(dropped[key]) if key in dropped else anchor[key]
                for key in anchor}
    assert_states_close(dare_ties(store, objective(), DareTiesParams(scale=1.2, drop=p, seed=seed),
                                  anchor=anchor).state_dict, expected)

@pytest.mark.parametrize("K, grouping", [(2, "tensor"), (4, "tensor"), (4, "block"), (4, "model")])
def test_model_stock_moves_each_group_by_the_ratio_its_mean_pairwise_cosine_gives(tmp_path, K, grouping):
    torch.manual_seed(7)
    store = toy_ingredients(tmp_path, K, spread=0.3, model=Blocks, seed=2)
    anchor = anchor_of(Blocks, seed=2)
    shared = {key: torch.randn_like(value) for key, value in anchor.items()}  # a common direction: cosines > 0
    store = shifted_ingredients(tmp_path, anchor, [{key: 0.5 * shared[key] + store.load(k)[key] - anchor[key]
                                                    for key in anchor} for k in range(K)])
    params = ModelStockParams(grouping=grouping)
    result = model_stock(store, objective(Blocks), params, anchor=anchor)
    assert_states_close(result.state_dict, reference_model_stock(store, anchor, grouping))
    assert 0 < float(result.beta.sum(0).min()) and float(result.beta.sum(0).max()) < 1  # t in (0, 1) here


@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
def test_wise_ft_interpolates_theta_0_and_the_fittest_ingredient(toys, alpha):
    store, anchor = toys
    best = max(range(len(store)), key=lambda k: store.ingredients[k].fit_acc)
    theta = store.load(best)
    expected = {key: (1 - alpha) * anchor[key] + alpha * theta[key] if key in floating(anchor) else anchor[key]
                for key in anchor}
    got = wise_ft(store, objective(), WiseFTParams(alpha=alpha), anchor=anchor).state_dict
    assert_states_close(got, expected)
    if alpha == 0.0:
        assert_states_close(got, anchor)
    if alpha == 1.0:
        assert_states_close(got, dict(theta))


@pytest.mark.parametrize("alpha", [0.0, 0.35, 1.0])
def test_wise_ft_of_a_soup_interpolates_theta_0_and_that_soup_with_its_weights_scaled_by_alpha(toys, alpha):
    store, anchor = toys
    soup = options("wise_ft_soup", store, anchor)["soup"]
    expected = {key: ((1 - alpha) * anchor[key] + alpha * soup.state_dict[key] if key in floating(anchor)
                      else anchor[key])
                for key in anchor}
    result = wise_ft_soup(store, objective(), WiseFTSoupParams(alpha=alpha, soup="mehl_soup"), anchor=anchor, soup=soup)
    assert_states_close(result.state_dict, expected)
    torch.testing.assert_close(result.beta, alpha * soup.beta, rtol=0, atol=0)
    assert result.layer_names == soup.layer_names and result.info["soup"] == "mehl_soup"
    if alpha == 1.0:
        assert_states_close(result.state_dict, soup.state_dict)


def test_wise_ft_of_a_soup_refuses_a_missing_soup_or_one_built_from_other_ingredients(tmp_path, toys):
    store, anchor = toys
    with pytest.raises(SoupError, match="build mehl_soup_auto first"):
        wise_ft_soup(store, objective(), WiseFTSoupParams(), anchor=anchor, soup=None)
    others = toy_ingredients(tmp_path / "others", 2)
    soup = run_method("uniform", others, objective(), method_params("uniform"))
    with pytest.raises(SoupError, match="was built from .* not from these ingredients"):
        wise_ft_soup(store, objective(), WiseFTSoupParams(), anchor=anchor, soup=soup)


@pytest.mark.parametrize("name", MERGES)
def test_each_merge_method_chooses_its_setting_on_select_data_from_its_whole_grid(toys, name):
    store, anchor = toys
    params = method_params(name)
    grid = params.search
    result = run_method(name, store, objective(), params, **options(name, store, anchor))
    table = result.info["search"]
    assert len(table) == math.prod(len(getattr(grid, field)) for field in grid.SETS)
    best = min(range(len(table)), key=lambda i: (table[i]["select_loss"], i))
    assert [row["chosen"] for row in table] == [i == best for i in range(len(table))]
    assert result.info["chosen"] == {key: table[best][key] for key in grid.SETS.values()}


@pytest.mark.parametrize("name", MERGES)
def test_a_merge_method_reads_select_data_only_to_score_each_candidate_once(toys, name):
    store, anchor = toys
    chosen_on = objective()
    chosen_on.select = Counted(toy_data(30, seed=5))
    params, given = method_params(name), options(name, store, anchor)
    run_method(name, store, chosen_on, params, **given)
    assert chosen_on.select.reads == 30 * math.prod(len(getattr(params.search, field)) for field in params.search.SETS)


@pytest.mark.parametrize("name", MERGES)
def test_a_merge_method_without_theta_0_or_with_another_model_says_so(toys, name):
    store, anchor = toys
    spec, given = get_spec(name), options(name, store, anchor)
    with pytest.raises(SoupError, match="pre-trained model theta_0"):
        spec.run(store, objective(), spec.params(), **{**given, "anchor": None}, name=name)
    with pytest.raises(SoupError, match="does not match the ingredients"):
        spec.run(store, objective(), spec.params(), **{**given, "anchor": anchor_of(Blocks)}, name=name)


def test_every_merge_method_is_registered_anchored_and_searched():
    assert all(SPECS[name].anchored and SPECS[name].searched for name in MERGES)


@pytest.mark.parametrize("name, bad", [("ties", {"density": 0.0}), ("dare", {"drop": 1.0}),
                                       ("wise_ft", {"alpha": 1.5}), ("wise_ft_soup", {"alpha": -0.1}),
                                       ("task_arithmetic", {"search": {"scales": []}}),
                                       ("ties", {"search": {"densities": [2]}})])
def test_an_impossible_setting_or_grid_is_refused_naming_the_key(name, bad):
    section = "refine" if get_spec(name).refines else "methods"
    with pytest.raises(SoupError, match=f"soup.{section}.{name}"):
        method_params(name, **bad)


@pytest.mark.parametrize("name", MERGES)
def test_a_merge_method_holds_one_tensor_of_one_ingredient_at_a_time_whatever_k(tmp_path, name):
    store, anchor = toy_ingredients(tmp_path, 6, spread=0.3), anchor_of()
    given = options(name, store, anchor)
    run_method(name, store, objective(), method_params(name), **given)
    held = 0 if get_spec(name).refines else 1  # a refinement reads the soup it refines, no ingredient
    assert store.peak_resident_count == held and store.resident_count == 0
    assert store.peak_resident_bytes <= held * max(store.ingredient_bytes([key]) for key in store.keys)


TWO_CANDIDATES = {"task_arithmetic": {"scales": [0.1, 0.3]}, "ties": {"scales": [1.0], "densities": [0.2, 0.5]},
                  "dare": {"scales": [0.1, 0.3], "drops": [0.5]}, "dare_ties": {"scales": [1.0], "drops": [0.5, 0.9]},
                  "model_stock": {"groupings": ["tensor", "model"]}, "wise_ft": {"alphas": [0.5, 1.0]},
                  "wise_ft_soup": {"alphas": [0.5, 1.0]}}  # the search keeps the better soup while it scores the next


@pytest.mark.parametrize("name", MERGES)
def test_a_merge_method_holds_at_most_four_model_sizes_whatever_k(tmp_path, name):
    """Built tensor by tensor, a merge method holds the soup it builds, the better candidate its search keeps and the
    model that scores a candidate, beside float64 sums the size of one tensor: under 4 models in the files' dtype
    (float32, so a model-sized float64 sum alone would be 2), counting every tensor it makes and every ingredient
    tensor it reads, at K = 8 (whole-model sums held 6 to 13)."""
    store = toy_ingredients(tmp_path, 8, dtype=torch.float32, spread=0.3, model=Deep)
    torch.manual_seed(0)
    anchor = Deep(torch.float32).state_dict()  # theta_0 of those ingredients
    deep = Objective(model_factory=lambda: Deep(torch.float32), fit=toy_data(40, dtype=torch.float32),
                     select=toy_data(40, seed=1, dtype=torch.float32), batch_size=40)
    refines = get_spec(name).refines
    given = {"anchor": anchor,
             **({"soup": run_method("uniform", store, deep, method_params("uniform"))} if refines else {})}
    params = method_params(name, search=TWO_CANDIDATES[name], **({"soup": "uniform"} if refines else {}))
    store = IngredientStore([ingredient.path for ingredient in store.ingredients])  # its counters are this method's
    with LiveTensorBytes() as made:
        run_method(name, store, deep, params, **given)
    model = store.ingredient_bytes()
    assert made.peak + store.peak_resident_bytes <= 4 * model, (made.peak / model, store.peak_resident_bytes / model)


def test_the_soup_stage_anchors_on_the_bases_zero_shot_model_and_refuses_another_base(tmp_path):
    from soup_pipeline.workspace.loading import open_anchor
    from soup_pipeline.workspace.paths import StagePaths

    store, anchor = toy_ingredients(tmp_path, 2), anchor_of()
    paths = StagePaths(tmp_path / "root")
    with pytest.raises(SoupError, match="zero_shot.safetensors is missing; run `soup-pipeline pretrain`"):
        open_anchor(paths, store)
    save_ingredient(anchor, paths.zero_shot_weights, meta={"base_model": "toy"})
    assert all(torch.equal(open_anchor(paths, store)[key], anchor[key]) for key in anchor)
    save_ingredient(anchor, paths.zero_shot_weights, meta={"base_model": "another-base"})
    with pytest.raises(SoupError, match=r"fine-tuned from \['toy'\], not from this pipeline's base another-base"):
        open_anchor(paths, store)
