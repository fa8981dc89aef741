"""A Hugging Face transformers text classifier (a tiny BERT) with tokenized dict batches: fine-tuned by the
pipeline's trainer, souped by the engine (MEHL-Soup, learned soup) and through `soup_subflow` (uniform, greedy,
MEHL-Soup+, TIES), evaluated; each soup checked against transformers' own forward pass."""

from __future__ import annotations

import dataclasses
import math
import random
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import BertConfig, BertForSequenceClassification, BertTokenizer

from soup_pipeline.core.data import DataSplits, TokenizedDataset
from soup_pipeline.core.families import family_of
from soup_pipeline.core.ingredients import IngredientStore
from soup_pipeline.core.portable_classifier import make_module
from soup_pipeline.core.settings import ModelParams
from soup_pipeline.runtime.errors import SoupError
from soup_pipeline.soups import Objective, method_params, run_method
from soup_pipeline.training.finetune import finetune

CLASSES = ("sport", "food", "music")
KEYWORDS = {"sport": "goal match team score coach league", "food": "bread soup salt cook meal taste",
            "music": "song guitar drum band choir tune"}
FILLER = "the a of on in at with today we they saw said very quite then later some many".split()
CONFIG = {"vocab_size": 64, "hidden_size": 16, "num_hidden_layers": 1, "num_attention_heads": 2,
          "intermediate_size": 32, "max_position_embeddings": 16}
BERT = ModelParams(family="transformers", arch="bert", kwargs=CONFIG)
LENGTH = 12


def tokenizer() -> BertTokenizer:
    """A real WordPiece tokenizer over the task's words, built offline from its vocabulary."""
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *FILLER, *" ".join(KEYWORDS.values()).split()]
    assert len(words) <= CONFIG["vocab_size"]
    return BertTokenizer(vocab={word: index for index, word in enumerate(words)})


TOKENIZER = tokenizer()


def sentences(count: int, seed: int) -> tuple[list[str], list[int]]:
    """Sentences of six filler words and two keywords of their class, shuffled."""
    rng = random.Random(seed)
    texts, labels = [], []
    for index in range(count):
        label = index % len(CLASSES)
        words = rng.sample(FILLER, 6) + rng.sample(KEYWORDS[CLASSES[label]].split(), 2)
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


def split(count: int, seed: int) -> TokenizedDataset:
    """`count` sentences tokenized to one padded length."""
    texts, labels = sentences(count, seed)
    encodings = TOKENIZER(texts, padding="max_length", max_length=LENGTH, truncation=True, return_tensors="pt")
    assert int((encodings["input_ids"] == TOKENIZER.unk_token_id).sum()) == 0  # every word is in the vocabulary
    return TokenizedDataset(dict(encodings), labels)


def text_splits() -> DataSplits:
    return DataSplits(train=split(150, 0), fit=split(60, 1), select=split(60, 2), test=split(90, 3),
                      classnames=CLASSES, templates=("{}",))


def hf_accuracy(state: dict[str, torch.Tensor], data: TokenizedDataset) -> float:
    """Accuracy by transformers' own classes and call (BertForSequenceClassification(**encodings).logits)."""
    model = BertForSequenceClassification(BertConfig(num_labels=len(CLASSES), **CONFIG)).eval()
    model.load_state_dict(state)
    with torch.no_grad():
        logits = model(**data.encodings).logits
    return float((logits.argmax(-1) == data.labels).float().mean())


@pytest.fixture(scope="module")
def sweep(tmp_path_factory):
    """A tiny BERT pre-trained here from random initialisation (the base), and three fine-tunes of it, all by the
    pipeline's trainer on tokenized batches."""
    folder = tmp_path_factory.mktemp("text")
    splits = text_splits()
    torch.manual_seed(0)
    save_file(make_module(family_of(BERT).spec(BERT, len(CLASSES))).state_dict(), str(folder / "init.safetensors"))

    def train(start: str, name: str, member: int, data: DataSplits, **hparams):
        return finetune(folder / start, {"weight_decay": 0.01, "batch_size": 16, "augmentation": "none", **hparams},
                        data, folder / name, member=member, model_params=BERT)

    pretrain = dataclasses.replace(splits, train=split(300, 4))
    base = train("init.safetensors", "base.safetensors", 99, pretrain, lr=2e-2, epochs=8, seed=0)
    assert base.meta["select_acc"] > 0.8  # the base knows the task; the fine-tunes move within its basin
    members = [train("base.safetensors", f"member-{k}.safetensors", k, splits, lr=lr, epochs=3, seed=k)
               for k, lr in enumerate((1e-3, 3e-3, 5e-3))]
    return folder, splits, members


def test_fine_tunes_of_a_text_classifier_learn_the_task_from_tokenized_batches(sweep):
    _, splits, members = sweep
    for member in members:
        state = load_file(str(member.path))
        assert member.meta["classifier_spec"]["builder_kwargs"]["model_type"] == "bert"
        assert hf_accuracy(state, splits.fit) == pytest.approx(member.meta["fit_acc"], abs=1e-6)  # same forward
        assert member.meta["select_acc"] > 0.8  # three classes: chance is 1/3


def test_the_engine_soups_tokenized_batches_with_mehl_soup_and_learned_soup(sweep):
    _, splits, members = sweep
    store = IngredientStore([m.path for m in members])
    states = [load_file(str(m.path)) for m in members]
    objective = Objective(model_factory=lambda: make_module(members[0].meta["classifier_spec"]), fit=splits.fit,
                          select=splits.select, batch_size=20)
    for name, settings in {"mehl_soup": {"passes": 2}, "learned_soup": {"epochs": 2}}.items():
        result = run_method(name, store, objective, method_params(name, device="cpu", **settings))
        assert result.history and all(map(math.isfinite, result.history)), name  # learned on tokenized batches
        beta = result.beta[:, 0].double()  # one coefficient per ingredient (L = 1)
        assert float(beta.sum()) == pytest.approx(1.0, abs=1e-6) and float((beta - 1 / 3).abs().max()) > 1e-4, name
        for key, tensor in result.state_dict.items():  # the soup is sum_k beta_k theta_k, as transformers loads it
            expected = sum(b * state[key].double() for b, state in zip(beta, states))
            assert torch.allclose(tensor.double(), expected, atol=1e-5), (name, key)
        assert hf_accuracy(result.state_dict, splits.test) > 0.8, name


def test_augmenting_tokenized_text_is_refused_before_anything_is_saved(sweep, tmp_path):
    folder, splits, _ = sweep
    with pytest.raises(SoupError, match=r"augmentation 'light' transforms images.*input_ids.*give augmentation 'none'"):
        finetune(folder / "base.safetensors", {"augmentation": "light", "epochs": 1}, splits,
                 tmp_path / "m.safetensors", member=0, model_params=BERT)
    assert not list(tmp_path.iterdir())


def test_a_tokenized_data_set_needs_one_row_per_label_and_the_pipeline_stages_refuse_text():
    with pytest.raises(SoupError, match=r"3 labels, but encodings of lengths \{'attention_mask': 2\}"):
        TokenizedDataset({"input_ids": torch.zeros(3, 4), "attention_mask": torch.zeros(2, 4)}, [0, 1, 2])
    with pytest.raises(SoupError, match="pipeline's stages read images.*soup_subflow"):
        family_of(BERT).preprocess(BERT, 32)


@pytest.mark.slow
def test_soup_subflow_soups_and_evaluates_a_text_classifier_and_refuses_to_register_it(sweep, tmp_path):
    from soup_pipeline.prefect import soup_subflow

    folder, splits, members = sweep
    common = dict(family="transformers", arch="bert", model_kwargs=CONFIG, num_classes=len(CLASSES), fit=splits.fit,
                  select=splits.select, test=splits.test, pretrained=str(folder / "base.safetensors"), batch_size=20)
    checkpoints = [str(m.path) for m in members]
    with pytest.raises(ValueError, match="registered model answers images"):
        soup_subflow(checkpoints, methods={"uniform": {}}, register="uniform", workdir=str(tmp_path / "refused"),
                     **common)
    assert not (tmp_path / "refused").exists()
    methods = {"uniform": {}, "greedy": {}, "mehl_soup_plus": {"passes": 1, "lr": 0.05},
               "ties": {"search": {"scales": [1.0], "densities": [0.5]}}}
    out = soup_subflow(checkpoints, methods=methods, workdir=str(tmp_path / "work"), **common)
    rows = {row["method"]: row for row in out["rows"]}
    assert set(rows) == {"best_individual", *methods} and out["registered_version"] is None
    mean = {k: sum(load_file(c)[k] for c in checkpoints) / len(checkpoints) for k in load_file(checkpoints[0])}
    uniform = load_file(out["soups"]["uniform"])
    assert all(torch.allclose(uniform[k], mean[k], atol=1e-6) for k in mean)
    for method in methods:  # each row's test accuracy is the one transformers' own forward gives its soup
        assert rows[method]["test_acc"] == pytest.approx(hf_accuracy(load_file(out["soups"][method]), splits.test),
                                                         abs=1e-6), method


def test_each_familys_package_is_imported_by_its_own_module_only():
    """timm in its family module, transformers in the builder the registered model calls, nowhere else."""
    package = Path(__file__).resolve().parents[1] / "soup_pipeline"
    owners = {"timm": {"core/families/timm_family.py"}, "transformers": {"core/portable_classifier.py"}}
    for name, allowed in owners.items():
        pattern = re.compile(rf"^\s*(from|import) {name}\b", re.MULTILINE)
        found = {str(path.relative_to(package)) for path in package.rglob("*.py") if pattern.search(path.read_text())}
        assert found == allowed, name
