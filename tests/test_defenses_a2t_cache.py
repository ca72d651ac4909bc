"""A2T's cache of adversarial texts (the budget version): made once, read back at every epoch and by later
runs, refused in one sentence for another tokenizer or model, resumed after a kill without a line twice."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from conftest import NEGATIVE, POSITIVE, grouped_embedding, make_tiny_classifier
from test_defenses_a2t import GROUPS, LONELY

from tightrope.data import TaskData
from tightrope.defenses import a2t_cache
from tightrope.defenses.a2t import A2TTraining
from tightrope.errors import TightropeError
from tightrope.models import save_model
from tightrope.train import TrainConfig, train

TEXTS = POSITIVE + NEGATIVE
LABELS = [1] * len(POSITIVE) + [0] * len(NEGATIVE)
DATA = TaskData("tiny", "train", TEXTS * 2, LABELS * 2, ("negative", "positive"))  # each text twice: attacked once


def _a2t(tokenizer, cache, **kwargs) -> A2TTraining:
    """An A2T objective on the hand-made synonym groups, counting the attack's calls in ``calls``."""
    a2t = A2TTraining(tokenizer, grouped_embedding(GROUPS, LONELY), max_length=32, max_share=1.0, min_words=10,
                      query_budget=1000, cache=cache, **kwargs)
    a2t.calls = []
    perturb = a2t.perturb

    def counted(model, texts, labels, width=None):
        a2t.calls.append(len(texts))
        return perturb(model, texts, labels, width)

    a2t.perturb = counted
    return a2t


def _config(model_dir, task, **kw) -> TrainConfig:
    base = dict(model=str(model_dir), task=str(task), eval_split="train", n_eval=8, max_length=32, batch_size=8,
                epochs=2, lr=1e-3, seed=0)
    return TrainConfig(**{**base, **kw})


def _prime(a2t, model, start=None, seed: int = 0):
    return a2t.before_training(model, DATA, TrainConfig(max_length=32, seed=seed), start=start)


def test_the_cache_is_made_once_and_read_back_across_epochs_and_by_a_second_seed(tiny_model_dir, tiny_task, tokenizer,
                                                                                   tmp_path):
    cache = tmp_path / "a2t-cache"
    first = _a2t(tokenizer, cache)
    card = train(_config(tiny_model_dir, tiny_task), tmp_path / "seed0", objective=first, progress=False)
    distinct = len(set(zip(TEXTS, LABELS)))
    assert card["steps"] == 12 and first.stats["attacked"] == 12 * 4  # two epochs of half-attacked batches
    assert first.calls == [distinct]  # one attack, before the first step; none per batch or per epoch
    lines = (cache / "texts.jsonl").read_text().splitlines()
    assert len(lines) == distinct and len({json.loads(x)["key"] for x in lines}) == distinct
    assert card["before_training"]["a2t_cache"]["examples"] == distinct
    assert any(r.changed for r in first.last) or first.stats["words_changed"] > 0  # the texts it trains on are adversarial

    second = _a2t(tokenizer, cache)
    train(_config(tiny_model_dir, tiny_task, seed=1), tmp_path / "seed1", objective=second, progress=False)
    assert second.calls == [] and second.stats["attacked"] == 12 * 4  # a second seed reads the same cache

    other_dir = save_model((make_tiny_classifier(tokenizer, seed=5), tokenizer), tmp_path / "other")
    with pytest.raises(TightropeError, match="was built against model"):
        train(_config(other_dir, tiny_task), tmp_path / "other-run", objective=_a2t(tokenizer, cache), progress=False)
    assert not (tmp_path / "other-run").exists()  # refused before anything was written


def test_a_cache_for_another_tokenizer_or_model_is_refused_in_one_sentence(tokenizer, tmp_path):
    cache = tmp_path / "a2t-cache"
    model = make_tiny_classifier(tokenizer, seed=1)
    _prime(_a2t(tokenizer, cache), model)

    other_tokenizer = copy.deepcopy(tokenizer)
    other_tokenizer.add_tokens(["zzzunseen"])
    for reuse in ("model", "base"):  # never across tokenizers, whatever the reuse
        with pytest.raises(TightropeError, match="adversarial texts never serve another tokenizer") as err:
            _prime(_a2t(other_tokenizer, cache, cache_reuse=reuse), model)
        message = str(err.value)
        assert message.endswith("pass --a2t-cache-rebuild or a new --a2t-cache path.") and message.count(". ") == 0

    other = make_tiny_classifier(tokenizer, seed=2)
    with pytest.raises(TightropeError, match="was built against model .* this run trains") as err:
        _prime(_a2t(tokenizer, cache), other)
    assert str(err.value).count(". ") == 0 and "--a2t-cache-reuse base" not in str(err.value)  # not a variant
    with pytest.raises(TightropeError, match="was built against model"):
        _prime(_a2t(tokenizer, cache, cache_reuse="base"), other)  # no common base

    with pytest.raises(TightropeError, match="another max length"):
        A2TTraining(tokenizer, grouped_embedding(GROUPS, LONELY), max_length=16, cache=cache).before_training(
            model, DATA, TrainConfig(max_length=16))

    rebuilt = _a2t(tokenizer, cache, cache_rebuild=True)
    meta = _prime(rebuilt, other)["a2t_cache"]
    assert rebuilt.calls and meta["built_against"]["weights"] == a2t_cache.weights_fingerprint(other)


def test_a_compressed_variant_of_the_same_base_reads_the_cache_only_when_allowed(tokenizer, tmp_path):
    base_dir = save_model((make_tiny_classifier(tokenizer, seed=1), tokenizer), tmp_path / "base")
    model = make_tiny_classifier(tokenizer, seed=1)
    cache = tmp_path / "a2t-cache"
    _prime(_a2t(tokenizer, cache), model, start=str(base_dir))

    pruned = make_tiny_classifier(tokenizer, seed=1)  # the same base, magnitude-pruned in memory
    with torch.no_grad():
        w = pruned.bert.encoder.layer[0].intermediate.dense.weight
        w[w.abs() < w.abs().median()] = 0.0
    with pytest.raises(TightropeError, match="both descend from the same base: --a2t-cache-reuse base"):
        _prime(_a2t(tokenizer, cache), pruned, start=str(base_dir))
    variant = _a2t(tokenizer, cache, cache_reuse="base")
    meta = _prime(variant, pruned, start=str(base_dir))["a2t_cache"]
    assert variant.calls == []
    assert meta["built_against"]["weights"] == a2t_cache.weights_fingerprint(model)
    assert meta["trains"]["weights"] == a2t_cache.weights_fingerprint(pruned)  # the card says which is which

    # A variant saved by tightrope compress names its source in its card: the same base, one folder away.
    variant_dir = save_model((pruned, tokenizer), tmp_path / "pruned")
    card = json.loads((variant_dir / "card.json").read_text()) if (variant_dir / "card.json").exists() else {}
    (variant_dir / "card.json").write_text(json.dumps({**card, "source": str(base_dir)}))
    assert a2t_cache.base_of(str(variant_dir)) == a2t_cache.base_of(str(base_dir))
    assert _a2t(tokenizer, cache, cache_reuse="base").before_training(
        pruned, DATA, TrainConfig(max_length=32), start=str(variant_dir))["a2t_cache"]["examples"] == 12


def test_training_data_is_a_matter_of_coverage(tokenizer, tmp_path):
    """A subset reads the cache; the same model extends it with new texts; a variant lacking texts is refused."""
    base_dir = save_model((make_tiny_classifier(tokenizer, seed=1), tokenizer), tmp_path / "base")
    model = make_tiny_classifier(tokenizer, seed=1)
    cache = tmp_path / "a2t-cache"
    _prime(_a2t(tokenizer, cache), model, start=str(base_dir))
    subset = _a2t(tokenizer, cache)
    subset.before_training(model, DATA.subset(5, 3), TrainConfig(max_length=32, seed=3), start=str(base_dir))
    assert subset.calls == []  # a second seed's subset of the same data: all there

    more = TaskData("tiny", "train", [*TEXTS, "a tedious, lifeless script", "a superb and moving film"],
                    [*LABELS, 0, 1], ("negative", "positive"))
    grown = _a2t(tokenizer, cache)
    grown.before_training(model, more, TrainConfig(max_length=32), start=str(base_dir))
    assert grown.calls == [2]  # only the two new texts are attacked, against the same model
    meta = json.loads((cache / "cache.json").read_text())
    assert meta["complete"] and meta["examples"] == 14 and meta["data_added"][0]["fingerprint"] == more.fingerprint()
    assert len((cache / "texts.jsonl").read_text().splitlines()) == 14

    newer = TaskData("tiny", "train", ["an awful, boring mess"], [0], ("negative", "positive"))
    pruned = make_tiny_classifier(tokenizer, seed=1)  # a variant of the same base
    with torch.no_grad():
        pruned.classifier.weight[0] = 0.0
    with pytest.raises(TightropeError, match="no adversarial text for 1 of this run's 1 distinct training texts") as err:
        _a2t(tokenizer, cache, cache_reuse="base").before_training(pruned, newer, TrainConfig(max_length=32),
                                                                   start=str(base_dir))
    assert str(err.value).count(". ") == 0
    rebuilt = _a2t(tokenizer, cache, cache_reuse="base", cache_rebuild=True)  # rebuilt against the variant
    rebuilt.before_training(pruned, newer, TrainConfig(max_length=32), start=str(base_dir))
    assert rebuilt.calls == [1] and len((cache / "texts.jsonl").read_text().splitlines()) == 1


def test_a_killed_generation_resumes_where_it_stopped_without_a_line_twice(tokenizer, tmp_path):
    model = make_tiny_classifier(tokenizer, seed=1)
    whole = _a2t(tokenizer, tmp_path / "whole")
    whole.cache_block = 4
    _prime(whole, model)
    assert whole.calls == [4, 4, 4]

    killed = _a2t(tokenizer, tmp_path / "killed")
    killed.cache_block = 4
    perturb = killed.perturb

    def dies_on_the_second_block(*args, **kwargs):
        if len(killed.calls) == 1:
            killed.calls.append("killed")
            raise KeyboardInterrupt
        return perturb(*args, **kwargs)

    killed.perturb = dies_on_the_second_block
    with pytest.raises(KeyboardInterrupt):
        _prime(killed, model)
    with open(tmp_path / "killed" / "texts.jsonl", "a") as f:
        f.write('{"key": "half a li')  # the kill also cut a line short
    assert not json.loads((tmp_path / "killed" / "cache.json").read_text())["complete"]

    resumed = _a2t(tokenizer, tmp_path / "killed")
    resumed.cache_block = 4
    _prime(resumed, model)
    assert resumed.calls == [4, 4]  # the two blocks left, not the finished one
    lines = (tmp_path / "killed" / "texts.jsonl").read_text().splitlines()
    assert len(lines) == 12 and len({json.loads(x)["key"] for x in lines}) == 12
    assert (tmp_path / "killed" / "texts.jsonl").read_bytes() == (tmp_path / "whole" / "texts.jsonl").read_bytes()


def test_the_same_seed_gives_the_same_cache(tokenizer, tmp_path):
    model = make_tiny_classifier(tokenizer, seed=1)
    for name in ("a", "b"):
        _prime(_a2t(tokenizer, tmp_path / name), model, seed=5)
    a, b = (json.loads((tmp_path / n / "cache.json").read_text()) for n in ("a", "b"))
    assert a == b and a["complete"] and a["built_for"]["seed"] == 5
    assert (tmp_path / "a" / "texts.jsonl").read_bytes() == (tmp_path / "b" / "texts.jsonl").read_bytes()
    rows = [json.loads(x) for x in (tmp_path / "a" / "texts.jsonl").read_text().splitlines()]
    assert any(r["changed"] for r in rows)  # the cache holds real attacks, not copies of the texts


def test_a_folder_that_is_not_a_cache_is_never_used_or_removed(tokenizer, tmp_path):
    folder = tmp_path / "results"
    folder.mkdir()
    (folder / "precious.txt").write_text("keep me")
    with pytest.raises(TightropeError, match="exists and is not an A2T cache"):
        _prime(_a2t(tokenizer, folder, cache_rebuild=True), make_tiny_classifier(tokenizer))
    assert (folder / "precious.txt").read_text() == "keep me"


def test_the_cache_is_read_only_after_before_training(tokenizer, tmp_path):
    a2t = _a2t(tokenizer, tmp_path / "c")
    with pytest.raises(TightropeError, match="read at the start of training"):
        a2t.from_cache(TEXTS[:1], LABELS[:1])
    with pytest.raises(TightropeError, match="cache_reuse must be one of model, base"):
        A2TTraining(tokenizer, grouped_embedding(GROUPS, LONELY), cache=tmp_path / "c", cache_reuse="any")
