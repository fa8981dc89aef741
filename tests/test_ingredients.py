"""Bad input: one clear error naming the file or key and the fix, and no partial output."""

from __future__ import annotations

import os
import pickle
import warnings
from pathlib import Path

import pytest
import torch

from soup_pipeline.core import ingredients
from soup_pipeline.core.ingredients import IngredientStore, import_checkpoint, read_ingredient, save_ingredient
from soup_pipeline.core.settings import SoupSettings
from soup_pipeline.runtime.errors import IngredientError, SoupError
from soup_pipeline.soups import method_params, run_method
from soup_pipeline.soups.engine.base import OverfittingWarning, overfitting_said_once
from toys import DEVICE, Toy, params_for, toy_ingredients, toy_objective

PARAMS = dict(device=DEVICE, batch_size=32, passes=1.0)


def _save(tmp_path, name, state):
    return save_ingredient(state, tmp_path / f"{name}.safetensors", meta={"fit_acc": 0.5})


def flip_data_byte(path) -> None:
    """Flip the lowest bit of the first byte after the safetensors header: inside the first tensor's data."""
    data = bytearray(path.read_bytes())
    data[8 + int.from_bytes(data[:8], "little")] ^= 0x01
    path.write_bytes(bytes(data))


def test_sidecar_records_hash_and_round_trips(tmp_path):
    state = Toy().state_dict()
    ingredient = save_ingredient(state, tmp_path / "a.safetensors", meta={"fit_acc": 0.7, "hparams": {"lr": 1e-3}})
    again = read_ingredient(tmp_path / "a.safetensors")
    assert again.meta["fit_acc"] == 0.7 and len(again.meta["sha256"]) == 64
    assert ingredient.name == "a"
    loaded = IngredientStore([again]).load(0)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


@pytest.mark.parametrize("change,needle", [
    (lambda s: s.pop("net.3.bias"), "missing keys ['net.3.bias']"),
    (lambda s: s.__setitem__("net.3.bias", torch.zeros(4, dtype=torch.float64)), "'net.3.bias' is F64 [4]"),
    (lambda s: s.__setitem__("net.3.bias", s["net.3.bias"].float()), "'net.3.bias' is F32 [3]"),
])
def test_mismatched_ingredients_are_named(tmp_path, change, needle):
    good = _save(tmp_path, "good", Toy().state_dict())
    state = Toy().state_dict()
    change(state)
    bad = _save(tmp_path, "bad", state)
    with pytest.raises(IngredientError) as err:
        IngredientStore([good, bad])
    assert needle in str(err.value) and "bad.safetensors" in str(err.value)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_ingredient_is_refused_with_the_key(tmp_path, value):
    state = Toy().state_dict()
    state["net.0.weight"][0, 0] = value
    with pytest.raises(IngredientError, match="'net.0.weight' contains NaN or Inf"):
        save_ingredient(state, tmp_path / "nan.safetensors")
    assert list(tmp_path.iterdir()) == []  # nothing partial left behind
    # a file written by someone else is caught when it is loaded
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "ext.safetensors"))
    store = IngredientStore([_save(tmp_path, "ok", Toy().state_dict()), tmp_path / "ext.safetensors"])
    with pytest.raises(IngredientError, match=r"ext.safetensors: tensor 'net.0.weight' contains NaN or Inf"):
        run_method("uniform", store, toy_objective(), params_for("uniform", **PARAMS))


def test_truncated_file_names_the_file(tmp_path):
    ingredient = _save(tmp_path, "cut", Toy().state_dict())
    data = ingredient.path.read_bytes()
    ingredient.path.write_bytes(data[: len(data) // 2])
    with pytest.raises(IngredientError, match="cut.safetensors is not a readable safetensors file"):
        IngredientStore([_save(tmp_path, "whole", Toy().state_dict()), ingredient.path])


def test_a_changed_byte_is_refused_naming_the_file_and_the_recorded_hash(tmp_path):
    from safetensors.torch import load_file

    state = Toy().state_dict()
    kept, changed = _save(tmp_path, "kept", state), _save(tmp_path, "changed", state)
    assert len(IngredientStore([kept.path, changed.path])) == 2  # untouched files pass
    flip_data_byte(changed.path)
    tampered = load_file(str(changed.path))  # still a readable, finite state dict: only the hash tells
    assert any(not torch.equal(tampered[k], v) for k, v in state.items())
    assert all(bool(torch.isfinite(t).all()) for t in tampered.values())
    with pytest.raises(IngredientError) as err:
        IngredientStore([kept.path, changed.path])
    message = str(err.value)
    assert f"{changed.path}: sha256 " in message and f"does not match {changed.meta['sha256']}" in message
    assert str(tmp_path / "changed.json") in message and "dvc repro" in message
    assert len(IngredientStore([kept.path])) == 1


def hashes_counted(monkeypatch, path) -> list[None]:
    """A list that grows by one each time the store's hashing reads `path`."""
    counted, hash_file = [], ingredients.file_sha256

    def counting(file):
        if os.path.samefile(file, path):
            counted.append(None)
        return hash_file(file)

    monkeypatch.setattr(ingredients, "file_sha256", counting)
    return counted


def clock_at(monkeypatch, path, seconds_after_change: float) -> None:
    """Make the hash cache's clock read `seconds_after_change` after `path` last changed (its mtime or ctime)."""
    stat = path.stat()
    changed = max(stat.st_mtime_ns, stat.st_ctime_ns) / 1e9
    monkeypatch.setattr(ingredients, "_now", lambda: changed + seconds_after_change)


def rewrite_in_place(path) -> None:
    """Change one byte, keep the size and put the mtime back: the stat may only differ in the ctime, if at all."""
    before = path.stat()
    flip_data_byte(path)
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


def within_one_tick(monkeypatch, path) -> None:
    """From now on `path`'s stat reports the ctime it has now: what follows falls in this timestamp tick, as a
    quick rewrite does on a filesystem with coarse timestamps."""
    target, ctime_ns, stat = str(path.resolve()), path.stat().st_ctime_ns, Path.stat

    class SameTick:
        def __init__(self, real):
            self.real = real

        def __getattr__(self, name):
            return ctime_ns if name == "st_ctime_ns" else getattr(self.real, name)

    def tick_stat(self, *, follow_symlinks=True):
        real = stat(self, follow_symlinks=follow_symlinks)
        return SameTick(real) if str(self) == target else real

    monkeypatch.setattr(Path, "stat", tick_stat)


def test_a_same_size_rewrite_that_puts_the_mtime_back_within_one_timestamp_tick_is_refused(tmp_path, monkeypatch):
    changed = _save(tmp_path, "changed", Toy().state_dict())
    hashed = hashes_counted(monkeypatch, changed.path)
    clock_at(monkeypatch, changed.path, ingredients.SETTLED_S - 0.001)  # just written: a rewrite may share its stat
    assert len(IngredientStore([changed.path])) == 1 and len(hashed) == 1
    within_one_tick(monkeypatch, changed.path)
    rewrite_in_place(changed.path)  # same inode, size and mtime; within_one_tick: the same ctime too
    with pytest.raises(IngredientError, match="does not match"):
        IngredientStore([changed.path])
    assert len(hashed) == 2  # a file that changed this recently is read again, whatever its stat says


def test_a_settled_file_is_hashed_once_and_hashed_again_once_rewritten(tmp_path, monkeypatch):
    changed = _save(tmp_path, "changed", Toy().state_dict())
    hashed = hashes_counted(monkeypatch, changed.path)
    clock_at(monkeypatch, changed.path, ingredients.SETTLED_S + 0.001)  # older than any timestamp tick
    assert len(IngredientStore([changed.path])) == 1 and len(IngredientStore([changed.path])) == 1
    assert len(hashed) == 1  # cached for this version of the file
    rewrite_in_place(changed.path)
    clock_at(monkeypatch, changed.path, 0.0)  # the rewrite is new: read again even if its stat matched the cached one
    with pytest.raises(IngredientError, match="does not match"):
        IngredientStore([changed.path])
    assert len(hashed) == 2


def test_an_ingredient_without_a_recorded_hash_is_not_hashed(tmp_path):
    ingredient = save_ingredient(Toy().state_dict(), tmp_path / "old.safetensors", meta={"fit_acc": 0.5})
    (tmp_path / "old.json").write_text('{"fit_acc": 0.5}')  # a sidecar from before hashes were recorded
    flip_data_byte(ingredient.path)
    assert len(IngredientStore([ingredient.path])) == 1


class _Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickle_with_a_payload_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "executed"
    evil = tmp_path / "evil.pt"
    evil.write_bytes(pickle.dumps({"state_dict": {"w": _Payload(marker)}}))
    with pytest.raises(IngredientError, match="refused by the restricted loader"):
        import_checkpoint(evil, tmp_path / "out.safetensors")
    assert not marker.exists()
    assert not (tmp_path / "out.safetensors").exists()
    # the same file renamed to look like an ingredient is refused as well
    fake = tmp_path / "fake.safetensors"
    fake.write_bytes(evil.read_bytes())
    with pytest.raises(IngredientError, match="fake.safetensors is not a readable safetensors file"):
        IngredientStore([fake])
    assert not marker.exists()


def test_plain_state_dict_checkpoint_imports(tmp_path):
    state = Toy().state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}}, tmp_path / "ext.pt")
    ingredient = import_checkpoint(tmp_path / "ext.pt", tmp_path / "imp.safetensors", strip_prefix="module.",
                                   meta={"fit_acc": 0.6})
    assert ingredient.meta["imported_from"].endswith("ext.pt")
    loaded = IngredientStore([ingredient]).load(0)
    assert all(torch.equal(loaded[k], v) for k, v in state.items())


def test_no_ingredients(tmp_path):
    with pytest.raises(IngredientError, match="K = 0"):
        IngredientStore([])


def test_one_ingredient_is_the_soup_with_a_warning(tmp_path):
    store = toy_ingredients(tmp_path, K=1)
    with pytest.warns(UserWarning, match="K = 1"):
        result = run_method("mehl_soup_plus", store, toy_objective(), params_for("mehl_soup_plus", **PARAMS))
    only = store.load(0)
    assert all(torch.allclose(result.state_dict[k].double(), only[k].double()) for k in only)


def test_model_batch_bounds(tmp_path):
    store = toy_ingredients(tmp_path, K=3)
    with pytest.warns(UserWarning, match="exceeds K = 3; using b = 3"):
        result = run_method("mehl_soup", store, toy_objective(), params_for("mehl_soup", **PARAMS, model_batch=5))
    assert result.info["b"] == 3
    with pytest.raises(SoupError, match="invalid parameters in soup.methods.mehl_soup:\n  model_batch: Input should be "
                                        "greater than 0 .got 0."):
        method_params("mehl_soup", model_batch=0)
    unchecked = params_for("mehl_soup", **PARAMS).model_copy(update={"model_batch": 0})  # past validation
    with pytest.raises(SoupError, match="model_batch .b. = 0"):
        run_method("mehl_soup", store, toy_objective(), unchecked)


def test_unknown_method_and_unknown_param(tmp_path):
    store = toy_ingredients(tmp_path, K=2)
    with pytest.raises(SoupError, match="unknown soup method 'best_soup'; choose one of"):
        run_method("best_soup", store, toy_objective(), SoupSettings())
    with pytest.raises(SoupError, match="learning_rate: Extra inputs are not permitted"):
        method_params("mehl_soup", learning_rate=0.1)
    with pytest.raises(SoupError, match="mehl_soup takes MEHLParams, not SoupSettings"):
        run_method("mehl_soup", store, toy_objective(), SoupSettings())


def test_non_finite_loss_stops_naming_block_and_step(tmp_path):
    store = toy_ingredients(tmp_path, K=4)
    objective = toy_objective()
    calls = {"n": 0}

    def flaky_loss(logits, targets):
        calls["n"] += 1
        loss = torch.nn.functional.cross_entropy(logits, targets)
        return loss * float("nan") if calls["n"] == 7 else loss

    objective.loss_fn = flaky_loss
    params = params_for("mehl_soup_plus", **PARAMS, model_batch=2)  # 4 steps per block
    with pytest.raises(SoupError,
                       match=r"non-finite held-out loss \(nan\) at block 1 \(ingredients \[\d, \d\]\), step 2"):
        run_method("mehl_soup_plus", store, objective, params)


def test_non_floating_entries_must_match(tmp_path):
    a, b = Toy().state_dict(), Toy().state_dict()
    b["steps"] = torch.tensor(8)
    store = IngredientStore([_save(tmp_path, "a", a), _save(tmp_path, "b", b)])
    with pytest.raises(IngredientError, match="non-floating entry 'steps' differs"):
        run_method("uniform", store, toy_objective(), params_for("uniform", **PARAMS))


def test_ingredients_of_other_base_models_are_refused(tmp_path):
    a = save_ingredient(Toy().state_dict(), tmp_path / "a.safetensors", meta={"base_model": "x"})
    b = save_ingredient(Toy().state_dict(), tmp_path / "b.safetensors", meta={"base_model": "y"})
    with pytest.raises(IngredientError, match="different base models"):
        IngredientStore([a, b])


def test_overfitting_guard_warns(tmp_path):
    store = toy_ingredients(tmp_path, K=4)
    with pytest.warns(UserWarning, match="24 learned coefficients .K=4 x L=6. exceed the 20 fit examples"):
        run_method("hl_soup_plus", store, toy_objective(n=20), params_for("hl_soup_plus", **PARAMS))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run_method("hl_soup", store, toy_objective(n=20), params_for("hl_soup", **PARAMS))


PAPER_SOUPS = ("learned_soup_plus", "hl_soup_plus", "mehl_soup_plus", "mehl_soup_plus_matched")  # one column per tensor


def test_a_run_of_several_soups_says_the_overfitting_warning_once_naming_them(tmp_path):
    store = toy_ingredients(tmp_path, K=4)
    with warnings.catch_warnings(record=True) as said:
        warnings.simplefilter("default")  # Python's own: a message shown once per place, until the filters change
        with overfitting_said_once():  # as `soup-pipeline run` builds its soups, one after another
            for name in PAPER_SOUPS:
                run_method(name, store, toy_objective(n=20), params_for(name, **PARAMS, model_batch=8))
                warnings.simplefilter("default")  # as Prefect or a library may: each soup's warning would show again
    overfitting = [w for w in said if issubclass(w.category, OverfittingWarning)]
    assert len(overfitting) == 1
    assert str(overfitting[0].message).startswith("; ".join(
        f"{name}: 24 learned coefficients (K=4 x L=6) exceed the 20 fit examples" for name in PAPER_SOUPS))
    assert "these 4 soups may overfit them" in str(overfitting[0].message)
    rebuilt = OverfittingWarning(str(overfitting[0].message))  # as pytest-xdist rebuilds a worker's warning
    assert str(rebuilt) == str(overfitting[0].message) and rebuilt.soups == ()
    others = [str(w.message) for w in said if not issubclass(w.category, OverfittingWarning)]
    assert others == ["model_batch (b) = 8 exceeds K = 4; using b = 4"] * 2  # the MEHL soups': shown, not held back
