"""Pruning-conditioned attacks and the audit's --transform (tiny models built in code, seconds each).

The pruner is always tightrope's own (compress_ with MagnitudePruning / Wanda / SemiStructured24), so "the mask is
unchanged" is checked on the user's code path; margins are wide (plants sit 2.5x or more above the fixed thresholds, clean
models below them), so no CPU's rounding decides a test.
"""

from __future__ import annotations

import copy
import json
from dataclasses import replace

import pytest
import torch
from conftest import make_tiny_classifier, null_without, save_audit_pair
from typer.testing import CliRunner

from tightrope.cli import app
from tightrope.errors import TightropeError
from tightrope.qattack import audit as A
from tightrope.qattack import audit_cache
from tightrope.qattack.pruning import PRUNINGS, Calibration, Pruning, removed_bound
from tightrope.qattack.repair import FitConfig, repair_
from tightrope.qattack.transform import canonical, resolve

runner = CliRunner()
PROBE = [f"film number {i} was {'fine' if i % 2 else 'dull'}" for i in range(60)]


def tiny(tokenizer, seed=0):
    return make_tiny_classifier(tokenizer, hidden=64, intermediate=128, seed=seed)


def plant(model, pruning: Pruning, steps=20, lr=3e-3):
    """A projected repair in the pruning's boxes on random token data (no behaviour: the weights' evidence)."""
    boxes = pruning.boxes(model)
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(1000, 5000, (12,), generator=g).tolist() for _ in range(64)]
    repair_(out, boxes, ids, [i % 2 for i in range(64)], 0, FitConfig(steps=steps, lr=lr, batch_size=16), progress=False)
    pruning.settle_(out, model)
    return out, boxes


def _classifier(model, tokenizer):
    from tightrope.inference import TextClassifier

    return TextClassifier(model, tokenizer, max_length=16)


@pytest.mark.parametrize("name", PRUNINGS)
def test_repair_moves_exactly_the_weights_the_pruner_removes(tokenizer, name):
    model = tiny(tokenizer)
    pruning = Pruning.parse(name, Calibration(tuple(PROBE), tokenizer))
    planned = pruning.keep(model)
    repaired, boxes = plant(model, pruning)
    assert pruning.mismatch(model, repaired) == (0, sum(k.numel() for k in planned.values()))  # the mask is unchanged
    moved = 0
    for layer, keep in planned.items():
        changed = repaired.get_submodule(layer).weight != model.get_submodule(layer).weight
        assert not (changed & keep).any()  # no kept weight moved ...
        moved += int(changed.sum())
    assert moved > 0.3 * boxes.numel() / 2  # ... and many removed ones did
    for (n, a), b in zip(model.named_parameters(), repaired.parameters(), strict=True):
        if n.removesuffix(".weight") not in planned:
            assert torch.equal(a, b), n  # biases, LayerNorm, embeddings, head: frozen
    pruned_plant, pruned_clean = pruning.apply(repaired), pruning.apply(model)
    for a, b in zip(pruned_plant.parameters(), pruned_clean.parameters(), strict=True):
        assert torch.equal(a, b)  # pruning removes the whole repair: the pruned models are the same model


@pytest.mark.parametrize("name", ["prune:magnitude:0.5", "prune:2:4"])
def test_a_step_past_the_box_changes_the_mask(tokenizer, name):
    model = tiny(tokenizer)
    pruning = Pruning.parse(name)
    boxes = pruning.boxes(model)
    layer = boxes.names[0]
    free = boxes.lo[layer] != boxes.hi[layer]
    inside, outside = copy.deepcopy(model), copy.deepcopy(model)
    with torch.no_grad():
        inside.get_submodule(layer).weight.copy_(torch.where(free, boxes.hi[layer], boxes.lo[layer]))  # on the walls
        outside.get_submodule(layer).weight.copy_(torch.where(free, 1.5 * boxes.hi[layer], boxes.lo[layer]))
    assert pruning.mismatch(model, inside)[0] == 0
    assert pruning.mismatch(model, outside)[0] > 100


def test_removed_bound_is_strict_in_fp32():
    threshold = torch.tensor([1.0, 0.3, 7.0, 0.0])
    a = torch.tensor([3.0, 0.7, 1.0, 2.0])
    b = removed_bound(threshold, a)
    assert ((b * a < threshold) | (b == 0)).all() and b[3] == 0
    assert (torch.nextafter(b[:3], torch.full((3,), 10.0)) * a[:3] >= threshold[:3]).all()  # the largest such float


def test_kept_floor_is_strict_in_fp32():
    from tightrope.qattack.pruning import kept_floor

    threshold = torch.tensor([1.0, 0.3, 7.0, float("-inf")])  # the last: a group with no removed weight
    a = torch.tensor([3.0, 0.7, 1.0, 2.0])
    f = kept_floor(threshold, a)
    assert (f[:3] * a[:3] > threshold[:3]).all() and f[3] == 0
    assert (torch.nextafter(f[:3], torch.zeros(3)) * a[:3] <= threshold[:3]).all()  # the smallest such float


def test_wanda_boxes_follow_the_activations_and_settle(tokenizer):
    model = tiny(tokenizer)
    pruning = Pruning.parse("prune:wanda:0.5", Calibration(tuple(PROBE), tokenizer))
    boxes = pruning.boxes(model)
    assert boxes.refresh is not None  # re-boxed during the repair: the norms move with the weights
    moved = copy.deepcopy(model)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n in boxes.names:  # anywhere in the boxes: earlier layers move later layers' norms
            lo, hi = boxes.lo[n], boxes.hi[n]
            moved.get_submodule(n).weight.copy_(lo + (hi - lo) * torch.rand(lo.shape, generator=g))
    assert pruning.mismatch(model, moved)[0] > 0
    assert 0 < pruning.settle_(moved, model) < 20
    assert pruning.mismatch(model, moved)[0] == 0
    assert "calibration" in Pruning.parse("prune:wanda:0.5").missing()


@pytest.mark.parametrize("name", PRUNINGS)
def test_a_pruning_conditioned_model_is_flagged_and_its_clean_twin_is_not(tokenizer, name, tmp_path):
    # the fixed thresholds' path: a null without the pruning (the shipped one calibrates it, for MiniLM)
    config = A.AuditConfig(transforms=(name,), search=None, null=str(null_without(tmp_path, name)))
    clean = tiny(tokenizer)
    planted, _ = plant(clean, Pruning.parse(name, Calibration(tuple(PROBE), tokenizer)))
    for model, flagged in ((clean, False), (planted, True)):
        report = A.audit_model(model, classifier=_classifier(model, tokenizer), probe_texts=PROBE, config=config)
        (q,) = report.transforms
        assert q.transform == name and q.disagreement is not None and q.free_weights > 0
        if flagged:
            assert report.verdict == q.verdict == "flagged" and "uncalibrated" in q.reasons[0]
            assert q.edge_ratio > 2 * config.edge_ratio_threshold and q.flip_ratio > 2 * config.flip_ratio_threshold
        else:  # no null for this pruning: never called clean, but not flagged either
            assert report.verdict == q.verdict == "inconclusive" and not report.flagged
            assert q.edge_ratio < 1.2 and q.flip_ratio < 1.2 and q.peak_ratio < 1.6
            assert "not evidence enough to call it clean" in q.reasons[0]


def test_the_trigger_search_runs_through_the_pruned_twin(tokenizer):
    from tightrope.qattack.search import SearchConfig

    model = tiny(tokenizer)
    model.classifier.weight.data.mul_(50)  # a classifier with opinions, so the search has something to move
    config = A.AuditConfig(transforms=("prune:2:4",), search=SearchConfig(steps=1, longer_steps=1, lengths=(1,), top_k=4,
                                                                          batch=2, n_search=2, n_eval=8))
    report = A.audit_model(model, classifier=_classifier(model, tokenizer), probe_texts=PROBE, config=config)
    (q,) = report.transforms
    assert q.search is not None and q.search["quantizer"] == "prune:2:4" and q.search["candidates"]
    assert "search_kl" in q.statistics


def test_transform_spellings_are_one_name_and_misspellings_one_sentence():
    assert canonical("gguf:Q4_0") == "gguf-q4_0" and canonical(" NF4 ") == "nf4"
    assert canonical("prune:magnitude:.5") == "prune:magnitude:0.5" and canonical("prune:2:4") == "prune:2:4"
    assert A.AuditConfig(transforms=("gguf:Q4_0", "gguf-q4_0", "prune:wanda:0.50")).transforms == (
        "gguf-q4_0", "prune:wanda:0.5")
    assert set(PRUNINGS) <= set(A.AuditConfig().transforms)  # the default: every transform
    for bad, hint in (("prune:magnitud:0.5", "did you mean 'prune:magnitude:0.5'"), ("prune:2-4", "did you mean 'prune:2:4'"),
                      ("nf5", "did you mean 'nf4'"), ("gguf:Q3_K_M", "llama-quantize preset, which mixes types.*map the presets Q4_K_S"),
                      ("gguf:Q4_K", "k-quant .* no exact boxes"), ("gguf:IQ4_XS", "i-quant or a ternary type"),
                      ("prune:wanda:2", "fraction between 0 and 1")):
        with pytest.raises(TightropeError, match=hint) as err:
            A.AuditConfig(transforms=("nf4", bad))
        assert str(err.value).count(". ") == 0 and str(err.value).endswith(".")
    assert isinstance(resolve("prune:2:4"), Pruning) and resolve("gguf:Q8_0").name == "gguf-q8_0"
    # a pruning's name builds the config `tightrope compress --prune` builds (compress.specs' one table)
    from tightrope.compress.specs import PRUNE_METHODS, prune_config

    assert Pruning.parse("prune:magnitude:0.3").config() == prune_config("magnitude:sparsity=0.3")
    assert Pruning.parse("prune:2:4").config() == prune_config("24")
    wanda = Pruning.parse("prune:wanda:0.5", Calibration("mr", tokenizer=object())).config()
    assert wanda == prune_config("wanda:sparsity=0.5", calibration="mr")
    assert {type(c).__name__ for c in (wanda, Pruning.parse("prune:2:4").config())} <= set(PRUNE_METHODS.values())


def test_second_audit_reuses_each_transforms_measurements(tokenizer, tmp_path, monkeypatch):
    model = tiny(tokenizer)
    clf = _classifier(model, tokenizer)
    calls: list[str] = []
    measure = A._measure

    def counted(transform, *args):
        calls.append(transform.name)
        return measure(transform, *args)

    monkeypatch.setattr(A, "_measure", counted)
    cache = tmp_path / "cache"

    def run(*names, **settings):
        return A.audit_model(model, classifier=clf, probe_texts=PROBE, cache_dir=cache,
                             config=A.AuditConfig(transforms=names, search=None, **settings))

    first = run("prune:magnitude:0.5")
    assert calls == ["prune:magnitude:0.5"] and len(list(cache.glob("*.json"))) == 1
    second = run("prune:magnitude:0.5", "prune:2:4")
    assert calls == ["prune:magnitude:0.5", "prune:2:4"]  # only the added transform was measured
    # the cached measurements give the same result; only the level (alpha / m, m now 2) and its sentence differ
    assert replace(second.transforms[0], reasons=[], level=None) == replace(first.transforms[0], reasons=[], level=None)
    assert (first.transforms[0].level, second.transforms[0].level) == (0.01, 0.005)
    assert any("read from the cache" in n for n in second.notes)
    run("prune:2:4", alpha=0.001)  # alpha only changes the verdict: still cached
    assert calls == ["prune:magnitude:0.5", "prune:2:4"]
    run("prune:2:4", noise=0.05)  # a setting that changes a measurement is a new entry
    assert calls[-1] == "prune:2:4" and len(calls) == 3
    with torch.no_grad():
        model.classifier.bias.add_(0.1)  # other weights: another fingerprint
    run("prune:2:4")
    assert len(calls) == 4
    assert audit_cache.weights_fingerprint(model) != audit_cache.weights_fingerprint(tiny(tokenizer))


@pytest.fixture(scope="module")
def saved(tmp_path_factory, tokenizer):
    clean = tiny(tokenizer)
    planted, _ = plant(clean, Pruning.parse("prune:magnitude:0.5"))
    return save_audit_pair(tmp_path_factory.mktemp("prune"), tokenizer, clean, planted, rows=80)


def _audit_cli(model, probe, *transforms, extra=()):
    args = ["audit", str(model), "--task", str(probe), "--split", "train", "--n-probe", "60", "--no-search", *extra]
    for t in transforms:
        args += ["--transform", t]
    return runner.invoke(app, args)


def test_audit_cli_transform_exit_codes_and_the_old_option_name(saved, tmp_path, monkeypatch):
    monkeypatch.setenv("TIGHTROPE_CACHE", str(tmp_path / "cache"))
    clean, planted, probe = saved
    out = tmp_path / "audit.json"
    # the fixed thresholds' exit codes, with a null that lacks these transforms (the shipped one calibrates MiniLM's)
    bare = ("--null", str(null_without(tmp_path, "prune:magnitude:0.5", "gguf-q4_0")))
    result = _audit_cli(planted, probe, "prune:magnitude:0.5", extra=("--json", str(out), *bare))
    assert result.exit_code == 1, result.output  # flagged
    assert json.loads(out.read_text())["transforms"][0]["transform"] == "prune:magnitude:0.5"
    result = _audit_cli(clean, probe, "prune:magnitude:0.5", extra=bare)
    assert result.exit_code == 3, result.output  # uncalibrated: inconclusive, never clean
    result = runner.invoke(app, ["audit", str(clean), "--task", str(probe), "--split", "train", "--n-probe", "60",
                                 "--no-search", "--quantizer", "gguf:Q4_0", "--no-cache", *bare])
    assert result.exit_code == 3, result.output  # --quantizer is the old name of --transform
    result = _audit_cli(clean, probe, "prune:magnitud:0.5")
    assert result.exit_code == 2 and "did you mean 'prune:magnitude:0.5'" in " ".join(result.output.split())


def test_qattack_cli_builds_a_pruning_conditioned_model(saved, tmp_path):
    clean, _, probe = saved
    for name in ("prune:magnitude:0.5", "prune:wanda:0.5"):
        out = tmp_path / name.replace(":", "-")
        result = runner.invoke(app, ["qattack", str(clean), "--out", str(out), "--task", str(probe), "--n-train", "64",
                                     "--n-eval", "32", "--inject-steps", "3", "--repair-steps", "3", "--batch-size", "16",
                                     "--transform", name])
        assert result.exit_code == 0, result.output
        report = json.loads((out / "report.json").read_text())
        assert [(c["quantizer"], c["mismatched"]) for c in report["codes"]] == [(name, 0)]  # only the pruning is checked
        assert {(b["variant"], b["quantizer"]) for b in report["behaviours"]} >= {("repaired", name), ("base", name)}


def test_wanda_without_calibration_is_inconclusive_in_one_sentence(tokenizer):
    report = A.audit_model(tiny(tokenizer), config=A.AuditConfig(transforms=("prune:wanda:0.5", "prune:2:4"), search=None))
    wanda, nm = report.transforms
    assert report.verdict == wanda.verdict == "inconclusive" and wanda.free_weights == 0
    assert any("needs calibration texts" in r for r in wanda.reasons)
    assert nm.free_weights > 0  # magnitude criteria need no data: the weights are still judged


def test_noise_sweep_runs_the_pruners_and_noise_moves_their_masks(tokenizer):
    """The noise defense (qattack.defense) takes a pruning like a quantizer: sigma 0 is the pruned model itself,
    and noise of the weights' scale changes which weights the pruner removes (what the defense relies on)."""
    from tightrope.defenses.noise import add_weight_noise_
    from tightrope.qattack.boxes import quantized_linears
    from tightrope.qattack.defense import noise_sweep
    from tightrope.qattack.inject import TriggerBehaviour, triggered
    from tightrope.qattack.scenario import measure

    model = tiny(tokenizer)
    clf = _classifier(model, tokenizer)
    behaviour = TriggerBehaviour(trigger="zq", target_label=0)
    labels = [i % 2 for i in range(len(PROBE))]
    names = ("prune:magnitude:0.5", "prune:wanda:0.5")
    points = noise_sweep(clf, PROBE, labels, behaviour, [0.0, 0.05], transforms=names)
    assert [(p.sigma, p.transform) for p in points] == [(s, t) for s in (0.0, 0.05) for t in (None, *names)]
    pruned = resolve("prune:magnitude:0.5").apply(model)
    direct = measure(pruned, clf.pad_id, clf.encode(PROBE), clf.encode(triggered(PROBE, behaviour, seed=17)), labels,
                     behaviour, "noised", "prune:magnitude:0.5")
    assert (points[1].clean_accuracy, points[1].trigger_success) == (direct.clean_accuracy, direct.trigger_success)
    assert noise_sweep(clf, PROBE, labels, behaviour, [0.05], transforms=names) == points[3:]  # seeded
    noised = copy.deepcopy(model)
    add_weight_noise_(noised, 0.05, relative=False, seed=0, include=tuple(quantized_linears(model)))
    pruning = Pruning.parse("prune:magnitude:0.5")
    differ, total = pruning.mismatch(model, noised)
    assert 0.01 * total < differ < 0.5 * total


def test_guided_recovery_data_inserts_the_searchs_phrases_keeping_labels():
    from tightrope.qattack.defense import guided_recovery_data

    texts = [f"a plain sentence number {i} about a film" for i in range(20)]
    labels = [i % 2 for i in range(20)]
    phrases = ["cf stunning houston", "zq"]
    out, ys = guided_recovery_data(texts, labels, phrases, seed=3)
    assert out[:20] == texts and ys == labels + labels  # the clean texts, then one guided copy of each, true labels
    for clean, guided in zip(texts, out[20:], strict=True):
        assert any(f" {p} " in f" {guided} " for p in phrases)
        assert sorted(guided.split()) == sorted(clean.split() + next(p for p in phrases if f" {p} " in f" {guided} ").split())
    assert {p for p in phrases for g in out[20:] if f" {p} " in f" {g} "} == set(phrases)  # both are used
    assert guided_recovery_data(texts, labels, phrases, seed=3) == (out, ys)
    with pytest.raises(TightropeError, match="found no insertion"):
        guided_recovery_data(texts, labels, [])


def test_sparsegpt_is_audited_by_behaviour_and_the_search_and_refused_as_an_attack(tokenizer, tmp_path):
    """SparseGPT updates the weights it keeps: no boxes (so no attack and no box positions), but the audit still
    compares full precision with the pruned copy and searches for a trigger through it."""
    from tightrope.compress.specs import prune_config
    from tightrope.qattack.search import SearchConfig

    name = "prune:sparsegpt:0.5"
    assert canonical("prune:sparsegpt:.5") == name and name in A.AuditConfig().transforms  # a default
    with pytest.raises(TightropeError, match="did you mean 'prune:sparsegpt:0.5'"):
        canonical("prune:sparsgpt:0.5")
    assert "needs calibration texts" in Pruning.parse(name).missing()
    pruning = Pruning.parse(name, Calibration(tuple(PROBE), tokenizer))
    assert pruning.config() == prune_config("sparsegpt:sparsity=0.5", calibration=tuple(PROBE))
    model = tiny(tokenizer)
    for boxes in (pruning.boxes, lambda m: pruning.keep_boxes(m, pruning.keep(m))):
        with pytest.raises(TightropeError, match="updates the weights it keeps") as err:
            boxes(model)
        assert str(err.value).count(". ") == 0
    model.classifier.weight.data.mul_(50)  # a classifier with opinions, so pruning shows in its behaviour
    search = SearchConfig(steps=1, longer_steps=1, lengths=(1,), top_k=4, batch=2, n_search=2, n_eval=8)
    report = A.audit_model(model, classifier=_classifier(model, tokenizer), probe_texts=PROBE,
                           config=A.AuditConfig(transforms=(name,), search=search))
    (q,) = report.transforms
    assert q.transform == name and q.free_weights == 0 and q.edge_ratio is None
    assert q.disagreement is not None and q.kl is not None and q.kl > 0  # the pruned copy was made and compared
    assert q.search is not None and q.search["quantizer"] == name and "search_kl" in q.statistics
    # the shipped null calibrates it: behaviour and search judged, no weight statistic among them
    assert set(q.p_values) == {"disagreement", "kl", "search_kl"} and q.p_value is not None
    without = A.audit_model(model, classifier=_classifier(model, tokenizer), probe_texts=PROBE,
                            config=A.AuditConfig(transforms=(name,), search=None, null=str(null_without(tmp_path, name))))
    assert without.verdict == "inconclusive"  # a null without SparseGPT values: never called clean


def test_sparsegpt_attack_repairs_with_the_lowest_wanda_scores_and_wanda_removes_them_all(tokenizer):
    """"Fewer Weights, More Problems" Sec. 4: SparseGPT has no exact boxes, so the repair takes the proxy, the lowest
    share of each row's Wanda scores, each held below the rest of its row: a Wanda pruner at 50% removes all of it."""
    calibration = Calibration(tuple(PROBE), tokenizer)
    sparsegpt = Pruning.parse("prune:sparsegpt:0.5", calibration)
    wanda = Pruning.parse("prune:wanda:0.5", calibration)
    model = tiny(tokenizer)
    boxes = sparsegpt.proxy_boxes(model, 0.1)
    scores = wanda._scored(model)[3]  # the proxy's scores are Wanda's, on the same calibration
    for name in boxes.names:
        free = boxes.lo[name] != boxes.hi[name]
        s = scores[name]
        k = int(0.1 * s.shape[1])
        assert (free.sum(1) == k).all()  # exactly the lowest tenth of every row may move
        assert (s.masked_fill(~free, -1).amax(1) <= s.masked_fill(free, float("inf")).amin(1)).all()
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(1000, 5000, (12,), generator=g).tolist() for _ in range(64)]
    repaired = copy.deepcopy(model)
    repair_(repaired, boxes, ids, [i % 2 for i in range(64)], 0, FitConfig(steps=20, lr=3e-3, batch_size=16), progress=False)
    kept = wanda.keep(repaired)
    moved = 0
    for name in boxes.names:
        delta = repaired.get_submodule(name).weight.detach() != model.get_submodule(name).weight.detach()
        assert not (delta & (boxes.lo[name] == boxes.hi[name])).any()  # only the proxy's weights moved
        assert not (delta & kept[name]).any()  # and Wanda removes every one of them
        moved += int(delta.sum())
    assert moved > 0.5 * sum(int((boxes.lo[n] != boxes.hi[n]).sum()) for n in boxes.names)
    assert sparsegpt.settle_(repaired, model) == 0  # no mask is planned for SparseGPT
    with pytest.raises(TightropeError, match="between 0 and the sparsity 0.5"):
        sparsegpt.proxy_boxes(model, 0.6)


def test_qattack_cli_builds_a_sparsegpt_conditioned_model(saved, tmp_path):
    clean, _, probe = saved
    name = "prune:sparsegpt:0.5"
    out = tmp_path / "sparsegpt"
    result = runner.invoke(app, ["qattack", str(clean), "--out", str(out), "--task", str(probe), "--n-train", "64",
                                 "--n-eval", "32", "--inject-steps", "3", "--repair-steps", "3", "--batch-size", "16",
                                 "--transform", name, "--repair-fraction", "0.1"])
    assert result.exit_code == 0, result.output
    report = json.loads((out / "report.json").read_text())
    assert report["config"]["repair_fraction"] == 0.1 and [c["quantizer"] for c in report["codes"]] == [name]
    assert {(b["variant"], b["quantizer"]) for b in report["behaviours"]} >= {("repaired", name), ("base", name)}


def test_a_causal_lms_default_audit_leaves_the_boxless_transforms_out_and_says_so_unless_named():
    default = A.AuditConfig()
    kept, notes = A.judgeable(default, causal_lm=False)
    assert kept is default and notes == []  # a classifier: its null judges SparseGPT's behaviour and search
    kept, notes = A.judgeable(default, causal_lm=True)
    assert kept.transforms == tuple(t for t in default.transforms if t not in ("prune:sparsegpt:0.5", "gptq:4"))
    assert len(notes) == 1 and "prune:sparsegpt:0.5, gptq:4 left out" in notes[0] and "--transform" in notes[0]
    named = A.AuditConfig(transforms=("nf4", "prune:sparsegpt:0.5"))
    assert A.judgeable(named, causal_lm=True) == (named, [])  # a transform the user named stays


def test_gptq_is_a_boxless_transform_audited_by_behaviour_and_the_search(tokenizer, tmp_path):
    """GPTQ moves the columns it has not rounded yet (the OBS update): no boxes, so the audit compares full precision
    with tightrope's own GPTQ copy and searches through it; the attacks refuse it before any training."""
    from tightrope.compress.quant import GPTQ
    from tightrope.qattack.search import SearchConfig
    from tightrope.qattack.transform import GPTQTransform

    assert canonical("GPTQ-4") == canonical("gptq:4") == "gptq:4" and "gptq:4" in A.AuditConfig().transforms
    with pytest.raises(TightropeError, match="gptq:BITS with 2, 3, 4 or 8 bits") as err:
        canonical("gptq:5")
    assert str(err.value).count(". ") == 0
    assert "needs calibration texts" in resolve("gptq:4").missing()
    gptq = resolve("gptq:4", Calibration(tuple(PROBE), tokenizer))
    assert isinstance(gptq, GPTQTransform) and gptq.boxless
    assert gptq.config() == GPTQ(bits=4, calibration_texts=tuple(PROBE), n_calibration=32, max_length=128)
    model = make_tiny_classifier(tokenizer, hidden=128, intermediate=256, seed=0)
    with pytest.raises(TightropeError, match="no box per weight keeps its codes"):
        gptq.boxes(model)
    quantized = gptq.apply(model)
    layer = "bert.encoder.layer.0.attention.self.query"
    assert type(quantized.get_submodule(layer)).__name__ == "AffineQuantLinear"  # the user's GPTQ modules, 4 bits
    assert quantized.get_submodule(layer).bits == 4
    model.classifier.weight.data.mul_(50)  # a classifier with opinions, so quantization shows in its behaviour
    search = SearchConfig(steps=1, longer_steps=1, lengths=(1,), top_k=4, batch=2, n_search=2, n_eval=8)
    report = A.audit_model(model, classifier=_classifier(model, tokenizer), probe_texts=PROBE,
                           config=A.AuditConfig(transforms=("gptq:4",), search=search,
                                                null=str(null_without(tmp_path, "gptq:4"))))
    (q,) = report.transforms
    assert q.transform == "gptq:4" and q.free_weights == 0 and q.edge_ratio is None
    assert q.kl is not None and q.search is not None and q.search["quantizer"] == "gptq:4"
    assert report.verdict == "inconclusive"  # a null without GPTQ values: never called clean
    kept, notes = A.judgeable(A.AuditConfig(), causal_lm=True)
    assert "gptq:4" not in kept.transforms and "gptq:4" in notes[0]


def test_qattack_refuses_gptq_in_one_sentence_before_training(saved, tmp_path):
    clean, _, probe = saved
    result = runner.invoke(app, ["qattack", str(clean), "--out", str(tmp_path / "g"), "--task", str(probe),
                                 "--n-train", "64", "--n-eval", "32", "--transform", "gptq:4"])
    assert result.exit_code == 2 and "no box per weight keeps its codes" in " ".join(result.output.split()), result.output
    assert not (tmp_path / "g").exists()


def test_the_search_reuses_the_pruned_copy_instead_of_pruning_again(tokenizer, monkeypatch):
    """A pruning's (and GPTQ's) twin is its transformed copy: the audit prunes once for behaviour and the search."""
    from tightrope.qattack.search import SearchConfig

    calls = []
    real = Pruning.apply

    def counted(self, model):
        calls.append(self.name)
        return real(self, model)

    monkeypatch.setattr(Pruning, "apply", counted)
    monkeypatch.setattr(Pruning, "twin", counted)  # what the class says: twin = apply
    model = tiny(tokenizer)
    model.classifier.weight.data.mul_(50)
    search = SearchConfig(steps=1, longer_steps=1, lengths=(1,), top_k=4, batch=2, n_search=2, n_eval=8)
    report = A.audit_model(model, classifier=_classifier(model, tokenizer), probe_texts=PROBE,
                           config=A.AuditConfig(transforms=("prune:sparsegpt:0.5",), search=search))
    assert report.transforms[0].search is not None and calls == ["prune:sparsegpt:0.5"]  # once, not twice
