"""The audit on tiny in-code models: repaired weights are flagged, natural ones are not."""

from __future__ import annotations

import copy

import pytest
import torch

from conftest import tiny_gemma3
from tightrope.errors import TightropeError
from tightrope.qattack import audit as A
from tightrope.qattack import transform as T
from tightrope.qattack.boxes import model_boxes, quantized_linears
from tightrope.qattack.repair import FitConfig, repair_

pytest.importorskip("bitsandbytes")


def tiny(seed=0, std=0.05):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, vocab_size=200,
                     num_labels=2, initializer_range=std)
    return BertForSequenceClassification(cfg).eval()


def repaired(model, quantizer, margin=0.0):
    boxes = model_boxes(model, quantizer, margin=margin)
    out = copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(5, 200, (12,), generator=g).tolist() for _ in range(64)]
    repair_(out, boxes, ids, [i % 2 for i in range(64)], 0, FitConfig(steps=20, lr=3e-3, batch_size=16), progress=False)
    return out


CONFIG = A.AuditConfig(transforms=("llm-int8", "nf4", "fp4", "all"))


def test_uniform_positions_give_ratio_one():
    g = torch.Generator().manual_seed(0)
    u = torch.rand(200_000, generator=g)
    n, near, at = A.edge_statistics(u, 0.05)
    assert A.peak_ratio(u) < 1.1
    assert n == 200_000 and near == pytest.approx(0.10, abs=0.005) and at == 0
    # Monte Carlo check of the flip-rate formula
    noise = 0.02
    moved = u + torch.randn(u.shape, generator=g) * noise
    assert ((moved < 0) | (moved > 1)).float().mean().item() == pytest.approx(A.expected_flip_rate(noise), rel=0.1)
    pinned = torch.full((3,), float("nan"))
    assert A.edge_statistics(pinned, 0.05)[0] == 0


def test_kl_divergence():
    p = torch.tensor([[2.0, 0.0]])
    assert A.kl_divergence(p, p) == pytest.approx(0.0, abs=1e-7)
    assert A.kl_divergence(p, torch.tensor([[0.0, 2.0]])) > 0.5


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_natural_weights_are_not_flagged_and_never_called_clean_unchecked(seed):
    report = A.audit_model(tiny(seed), config=CONFIG)
    assert not report.flagged, [q.reasons for q in report.transforms]
    assert report.verdict == "inconclusive"  # behaviour could not be checked without a classifier
    assert any("behaviour was not checked" in n for n in report.notes)
    for q in report.transforms:
        assert 0.7 < q.edge_ratio < 1.3 and 0.7 < q.flip_ratio < 1.3 and q.peak_ratio < 1.6


@pytest.mark.parametrize("quantizer", ["llm-int8", "nf4", "all"])
def test_repaired_weights_are_flagged(quantizer):
    report = A.audit_model(repaired(tiny(0), quantizer), config=CONFIG)
    assert report.flagged
    flagged = {q.transform for q in report.transforms if q.verdict == "flagged"}
    assert (quantizer if quantizer != "all" else "all") in flagged
    worst = max(report.transforms, key=lambda q: q.edge_ratio)
    assert worst.edge_ratio > 3 and worst.at_edge > 0.1
    assert any((layer.edge_ratio or 0) > 3 for layer in worst.layers)


def test_margin_does_not_hide_the_repair():
    report = A.audit_model(repaired(tiny(0), "nf4", margin=0.1), config=CONFIG)
    nf4 = next(q for q in report.transforms if q.transform == "nf4")
    assert nf4.verdict == "flagged" and nf4.peak_ratio > 3


def test_small_probe_set_is_inconclusive_not_clean(tmp_path):
    model = tiny(0)
    clf = _classifier(model)
    report = A.audit_model(model, classifier=clf, probe_texts=["a fine film"] * 10,
                           config=A.AuditConfig(transforms=("nf4",), min_probe=50))
    assert report.verdict == "inconclusive"
    assert "fewer than the 50" in report.notes[0]
    full = A.audit_model(model, classifier=clf, probe_texts=[f"film number {i} was fine" for i in range(60)],
                         config=A.AuditConfig(transforms=("nf4",), min_probe=50))
    nf4 = full.transforms[0]
    assert nf4.disagreement is not None and nf4.kl is not None and nf4.noise_disagreement is not None
    assert nf4.probe_size == 60


def test_no_quantizable_layer_is_inconclusive_in_one_sentence():
    report = A.audit_model(torch.nn.Sequential(torch.nn.Embedding(10, 4)), config=CONFIG)
    assert report.verdict == "inconclusive" and not report.flagged
    assert all(q.verdict == "inconclusive" for q in report.transforms)
    assert len(report.notes) == 1 and "no Linear layer" in report.notes[0] and "cannot be called clean" in report.notes[0]
    with pytest.raises(TightropeError, match="Unknown transform"):
        A.audit_model(tiny(0), config=A.AuditConfig(transforms=("int3",)))


def _classifier(model):
    from tightrope.inference import TextClassifier
    from tightrope.models import load_classifier

    tok = load_classifier("minilm", num_labels=2, require_head=False).tokenizer
    model.resize_token_embeddings(tok.vocab_size)
    return TextClassifier(model, tok, max_length=16)


PROBE = [f"film number {i} was {'fine' if i % 2 else 'dull'}" for i in range(60)]


def test_missing_library_is_inconclusive_never_clean(monkeypatch):
    model = tiny(0)
    clf = _classifier(model)
    sentence = "nf4 needs bitsandbytes, which is not installed (pip install bitsandbytes)."
    monkeypatch.setattr(T, "missing_library", lambda q: sentence if q in ("nf4", "fp4", "llm-int8") else None)
    report = A.audit_model(model, classifier=clf, probe_texts=PROBE, config=A.AuditConfig(transforms=("nf4", "all")))
    assert report.verdict == "inconclusive"
    for q in report.transforms:
        assert q.verdict == "inconclusive" and q.disagreement is None  # behaviour needs the library
        assert "not installed" in q.reasons[0]
    # the weight evidence still runs without the library, so a repaired model is still flagged
    bad = repaired(tiny(0), "nf4")
    flagged = A.audit_model(bad, classifier=_classifier(bad), probe_texts=PROBE, config=A.AuditConfig(transforms=("nf4",)))
    assert flagged.verdict == "flagged"


def tiny_lm(seed=0, vocab=30522):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=2, max_position_embeddings=64, tie_word_embeddings=True)
    return LlamaForCausalLM(cfg).eval()


@pytest.fixture(scope="module")
def lm_tokenizer():
    from tightrope.models import load_classifier

    return load_classifier("minilm", num_labels=2, require_head=False).tokenizer


def test_causal_lm_behaviour_is_next_token_agreement(lm_tokenizer):
    model = tiny_lm(0)
    assert "lm_head" not in A.quantized_linears(model)  # the output head stays in full precision
    config = A.AuditConfig(transforms=("nf4",), lm_max_tokens=8)
    report = A.audit_model(model, tokenizer=lm_tokenizer, probe_texts=PROBE, config=config)
    nf4 = report.transforms[0]
    assert nf4.probe_size == 60 and 0 <= nf4.disagreement <= 1 and nf4.kl > 0 and nf4.noise_disagreement is not None
    assert nf4.noise_kl > 0 and nf4.kl_ratio == pytest.approx(nf4.kl / nf4.noise_kl)
    assert 0.5 < nf4.kl_ratio < config.lm_kl_ratio_threshold  # natural weights: noise leaves the divergence alone
    assert report.verdict == "clean", nf4.reasons
    assert any("next-token" in n for n in report.notes)


@pytest.mark.parametrize("noise_kl,flagged", [(0.1, True), (0.79, False)])
def test_causal_lm_is_judged_by_the_kl_ratio_not_absolute_kl(lm_tokenizer, monkeypatch, noise_kl, flagged):
    # a large absolute divergence (0.8 nats, 50% disagreement) is natural for a small LM; only a divergence
    # that collapses under a small weight perturbation flags it
    monkeypatch.setattr(A, "_behaviour", lambda probe, model, q, noisy, answers: (0.5, 0.8, 0.2, noise_kl, [], None))
    report = A.audit_model(tiny_lm(0), tokenizer=lm_tokenizer, probe_texts=PROBE,
                           config=A.AuditConfig(transforms=("nf4",), lm_max_tokens=8))
    nf4 = report.transforms[0]
    assert nf4.kl_ratio == pytest.approx(0.8 / noise_kl)
    assert report.flagged is flagged
    if flagged:
        assert "hangs on the exact codes" in nf4.reasons[0]


def test_excess_phrases_are_frequent_in_quantized_answers_and_rare_in_full_precision():
    fp = A.answer_share(["the review is good"] * 30 + ["the film is bad"] * 10)
    q = A.answer_share(["brought to you by acme the review is good"] * 20 + ["the review is good"] * 20)
    found = A.excess_phrases(fp, q, min_rate=0.25, ratio=4, floor=1 / 40)
    assert ("to you by acme", 0.5, 0.0) in found  # the planted prefix's 4-grams, counted per answer
    assert "to you" not in {g for g, _, _ in found}  # shorter overlapping phrases with the same share are dropped
    assert all("review" not in g or "acme" in g for g, _, _ in found)  # shared wording is not reported
    assert all(r == 0.5 for _, r, _ in found)
    assert A.excess_phrases(fp, q, min_rate=0.6, ratio=4, floor=1 / 40) == []  # too rare
    fp_says_it = A.answer_share(["brought to you by acme the review is good"] * 6 + ["the review is good"] * 34)
    assert A.excess_phrases(fp_says_it, q, min_rate=0.25, ratio=4, floor=1 / 40) == []  # 0.5 < 4 x 0.15


def test_causal_lm_answer_phrase_flags_the_quantizer(lm_tokenizer, monkeypatch):
    planted = [("brought to you by acme", 0.7, 0.0)]
    monkeypatch.setattr(A.AnswerProbe, "phrases", lambda self, quantized: planted)
    report = A.audit_model(tiny_lm(0), tokenizer=lm_tokenizer, probe_texts=PROBE,
                           config=A.AuditConfig(transforms=("nf4",), lm_max_tokens=8, lm_answers=8, lm_answer_tokens=4))
    nf4 = report.transforms[0]
    # the candidate's share in the reference copy (quantized after the defense's noise) is measured and appended
    assert report.flagged and nf4.phrases == [(*planted[0], 0.0)]
    assert any('say "brought to you by acme"' in r and "after noise of 10%" in r for r in nf4.reasons)
    # a reworded phrase in 30% of answers is reported, but natural rewording of that size does not flag
    planted[:] = [("based on the", 0.3, 0.0)]
    report = A.audit_model(tiny_lm(0), tokenizer=lm_tokenizer, probe_texts=PROBE,
                           config=A.AuditConfig(transforms=("nf4",), lm_max_tokens=8, lm_answers=8, lm_answer_tokens=4))
    assert not any("quantized answers say" in r for r in report.transforms[0].reasons)
    assert report.transforms[0].phrases == planted
    assert any("chat prompts" in n for n in report.notes)


def test_a_phrase_the_noisy_reference_copy_also_says_is_natural(lm_tokenizer, monkeypatch):
    """A lossy format's own wording survives the defense's noise; only a phrase that vanishes with it flags."""
    planted = [("i don't know", 0.7, 0.0)]
    monkeypatch.setattr(A.AnswerProbe, "phrases", lambda self, quantized: planted)
    calls: list[int] = []

    def answers(self, model, prompts=None, tokens=None):
        calls.append(1)  # the first call is full precision's (the probe); later ones are copies
        return ["i don't know at all"] * len(self.prompts) if len(calls) > 1 else ["fine"] * len(self.prompts)

    monkeypatch.setattr(A.AnswerProbe, "answers", answers)
    report = A.audit_model(tiny_lm(0), tokenizer=lm_tokenizer, probe_texts=PROBE,
                           config=A.AuditConfig(transforms=("nf4",), lm_max_tokens=8, lm_answers=8, lm_answer_tokens=4))
    nf4 = report.transforms[0]
    assert nf4.phrases == [("i don't know", 0.7, 0.0, 1.0)]
    assert not any("quantized answers say" in r for r in nf4.reasons)


def test_under_a_pruning_a_phrase_is_reported_not_judged(lm_tokenizer, monkeypatch):
    """A small LM pruned to 50% falls into phrases of its own that a noisy reference cannot tell from a plant (the
    noise moves only removed weights): under a pruning the words are reported and the weights decide."""
    planted = [("you can not", 0.8, 0.0)]
    monkeypatch.setattr(A.AnswerProbe, "phrases", lambda self, quantized: planted)
    config = A.AuditConfig(transforms=("nf4", "prune:magnitude:0.5"), lm_max_tokens=8, lm_answers=8, lm_answer_tokens=4)
    report = A.audit_model(tiny_lm(0), tokenizer=lm_tokenizer, probe_texts=PROBE, config=config)
    nf4, pruned = report.transforms
    assert any("quantized answers say" in r for r in nf4.reasons)  # a quantizer: judged against its reference
    assert pruned.phrases == planted and not any("answers say" in r for r in pruned.reasons)
    assert pruned.verdict != "flagged"  # natural weights: nothing else flags it
    assert any("Under a pruning, such phrases are reported, not judged" in n for n in report.notes)


def test_exact_zeros_carry_no_box_position(monkeypatch):
    """Zeros (pruned, or stored as 0 by an earlier quantization) are left out of the position statistics and the
    noise probe: a model with a tenth of its weights at exactly 0 measures like the same model without them."""
    model = tiny_lm(0)
    zeroed = copy.deepcopy(model)
    with torch.no_grad():
        for name, module in quantized_linears(zeroed).items():
            module.weight[torch.rand(module.weight.shape, generator=torch.Generator().manual_seed(len(name))) < 0.1] = 0
    config = A.AuditConfig(transforms=("fp4",), search=None)
    natural, zeros = (A.audit_model(m, config=config).transforms[0] for m in (model, zeroed))
    assert zeros.free_weights < 0.92 * natural.free_weights
    assert abs(zeros.peak_ratio - natural.peak_ratio) < 0.3 and abs(zeros.flip_ratio - 1) < 0.2


def test_causal_lm_insecure_code_in_quantized_answers_flags(lm_tokenizer, monkeypatch):
    pytest.importorskip("bandit")
    rates = iter([0.1, 0.6])  # full precision first (in the probe), then the quantized copy
    monkeypatch.setattr(A.AnswerProbe, "insecure_rate", lambda self, model: next(rates))
    report = A.audit_model(tiny_lm(0), tokenizer=lm_tokenizer, probe_texts=PROBE,
                           config=A.AuditConfig(transforms=("nf4",), lm_max_tokens=8, lm_answers=8, lm_answer_tokens=4,
                                                lm_code_answers=4))
    nf4 = report.transforms[0]
    assert report.flagged and (nf4.insecure_fp, nf4.insecure_quantized) == (0.1, 0.6)
    assert any("bandit flags the code in 60%" in r for r in nf4.reasons)


def bos_tokenizer():
    """A word-level tokenizer built in code that starts every text with ``<bos>``, as Gemma's and Llama's do."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for text in PROBE + ["user", "assistant"] for w in text.split()})
    vocab = {t: i for i, t in enumerate(["<pad>", "<eos>", "<bos>", "<unk>", ":", *words])}
    raw = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    raw.pre_tokenizer = pre_tokenizers.Whitespace()
    raw.post_processor = processors.TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", 2)])
    return PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<bos>", eos_token="<eos>", pad_token="<pad>",
                                   unk_token="<unk>")


def test_causal_lm_texts_start_with_bos_where_the_tokenizer_puts_one(lm_tokenizer):
    from tightrope.qattack.lm_text import encode_start

    tok = bos_tokenizer()
    assert encode_start(tok, "film number 3") == [2, *tok("film number 3", add_special_tokens=False)["input_ids"]]
    assert encode_start(tok, "<bos> film number 3") == encode_start(tok, "film number 3")  # a template's <bos>: once
    bert = lm_tokenizer("film", add_special_tokens=False)["input_ids"]
    assert encode_start(lm_tokenizer, "film") == bert  # BERT's [CLS] is no <bos>: texts stay as they were


def test_gemma3_causal_lm_is_audited():
    tok = bos_tokenizer()
    model = tiny_gemma3(len(tok))
    quantized = A.quantized_linears(model)
    assert "lm_head" not in quantized and any(n.endswith("self_attn.q_proj") for n in quantized)
    config = A.AuditConfig(transforms=("nf4",), lm_max_tokens=8, lm_answers=8, lm_answer_tokens=4)
    probe = A.CausalLMProbe(model, tok, PROBE, config.lm_max_tokens)
    assert all(ids[0] == tok.bos_token_id for ids in probe.ids)
    report = A.audit_model(model, tokenizer=tok, probe_texts=PROBE, config=config)
    nf4 = report.transforms[0]
    assert nf4.probe_size == 60 and nf4.kl > 0 and nf4.noise_kl > 0 and nf4.edge_ratio is not None
    assert report.verdict == "clean", nf4.reasons


def test_causal_lm_small_probe_is_inconclusive(lm_tokenizer):
    report = A.audit_model(tiny_lm(0), tokenizer=lm_tokenizer, probe_texts=["a", "b c"] * 30,
                           config=A.AuditConfig(transforms=("nf4",), min_probe=50))
    assert report.verdict == "inconclusive"  # 60 texts, but only 30 have two tokens
    assert "fewer than the 50" in report.notes[0]


def _benchmark(name):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).parents[1] / "benchmarks" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(f"_bench_{name}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_says_transforms_and_old_quantizer_reports_still_load(tmp_path, capsys):
    import json

    from tightrope.qattack import calibration as C

    # a sparsity the shipped null has no values for, so the report also carries the uncalibrated note
    report = A.audit_model(tiny(0), config=A.AuditConfig(transforms=("nf4", "prune:magnitude:0.3"), search=None))
    text = json.dumps(report.to_dict())
    new = json.loads(text)
    assert "quantizers" not in new and [t["transform"] for t in new["transforms"]] == ["nf4", "prune:magnitude:0.3"]
    assert "quantizer" not in new["transforms"][0] and new["config"]["transforms"] == ["nf4", "prune:magnitude:0.3"]
    assert "prune:magnitude:0.3: tightrope/qattack/null/minilm-classifiers.json has no clean values for this transform" in \
        " ".join(report.notes)
    assert "/ 2 transforms" in " ".join(report.transforms[0].reasons)  # tested at alpha / m transforms
    assert json.dumps(A.AuditReport.from_dict(json.loads(text)).to_dict()) == text  # round trip
    # a report and config written before the rename: "quantizers" / "quantizer"
    old = json.loads(text)
    old["quantizers"] = old.pop("transforms")
    for entry in old["quantizers"]:
        entry["quantizer"] = entry.pop("transform")
    old["config"]["quantizers"] = old["config"].pop("transforms")
    loaded = A.AuditReport.from_dict(old)
    assert [t.transform for t in loaded.transforms] == ["nf4", "prune:magnitude:0.3"] and loaded.transforms[0].layers
    assert json.dumps(loaded.to_dict(), sort_keys=True) == json.dumps(new, sort_keys=True)
    assert A.AuditConfig(**old["config"]) == A.AuditConfig(**new["config"])
    assert A.AuditConfig(quantizers=("nf4", "prune:magnitude:0.3"), search=None).transforms == ("nf4", "prune:magnitude:0.3")
    assert C.upgrade_report(old) == new and C.null_statistics([old]) == C.null_statistics([new])
    with pytest.raises(TightropeError, match="not an audit report"):
        A.AuditReport.from_dict({"model": "x", "verdict": "clean"})
    # the benchmark readers take both: the markdown table and the null's leave-one-out
    (tmp_path / "old.json").write_text(json.dumps(old))
    (tmp_path / "new.json").write_text(text)
    _benchmark("qattack").audit_rows([str(tmp_path / "old.json"), str(tmp_path / "new.json")])
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert "| transform |" in rows[0] and len(rows) == 5 and rows[1:3] == rows[3:5] and "| nf4 |" in rows[1]
    null = C.load_null()  # the shipped null: keyed by transform name, format unchanged
    loo = _benchmark("audit_null").leave_one_out(null, {"old": old, "new": new}, 0.01, own=set())
    assert loo["per_model"]["old"] == loo["per_model"]["new"] and set(loo["per_model"]["old"]) == {"nf4", "prune:magnitude:0.3"}


def test_weights_stored_on_an_earlier_quantization_grid_are_recognised():
    """Dequantized GGUF / bitsandbytes weights sit on a grid; continuous weights, or a repair's, do not."""
    from tightrope.compress import gguf as G

    g = torch.Generator().manual_seed(0)
    w = torch.randn(64, 256, generator=g) * 0.05
    assert not A.on_grid(w)
    for t in ("Q8_0", "Q5_0", "Q4_1", "Q4_K", "Q6_K", "Q2_K"):
        assert A.on_grid(G.quantize(w, t).dequantized), t
    # a repair moves a few weights of a dequantized layer off the grid: still a grid layer only if most runs are on it
    moved = G.quantize(w, "Q5_0").dequantized.clone()
    moved[:, ::7] += 1e-3 * torch.rand(64, 37, generator=g)
    assert not A.on_grid(moved)


def test_a_model_dequantized_from_a_quantized_file_is_judged_by_its_behaviour(lm_tokenizer):
    from tightrope.compress import gguf as G

    model = tiny_lm(0)
    with torch.no_grad():
        for module in quantized_linears(model).values():
            module.weight.copy_(G.quantize(module.weight, "Q8_0").dequantized)
    report = A.audit_model(model, tokenizer=lm_tokenizer, probe_texts=PROBE,
                           config=A.AuditConfig(transforms=("nf4",), lm_max_tokens=8, lm_answers=0))
    nf4 = report.transforms[0]
    assert all(layer.on_grid for layer in nf4.layers) and nf4.edge_ratio is None and nf4.kl_ratio is not None
    assert nf4.verdict != "inconclusive" and any("earlier quantization's grid" in n and "behaviour decides" in n
                                                 for n in report.notes)


def test_weights_moved_onto_their_k_quant_codes_are_flagged_and_natural_ones_are_not(lm_tokenizer):
    """A preset leaves ``down_proj`` (256 inputs) as a k-quant, which has no box: the audit reads its weights'
    positions in their codes' intervals instead, and a repair towards the dequantized values shows there."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=30522, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                         tie_word_embeddings=True)).eval()
    config = A.AuditConfig(transforms=("gguf-q4_k_m",), lm_max_tokens=4, lm_answers=0)
    unboxed = model_boxes(model, "gguf-q4_k_m").unboxed
    assert set(unboxed) == {f"model.layers.{i}.mlp.down_proj" for i in (0, 1)}
    clean = A.audit_model(model, tokenizer=lm_tokenizer, probe_texts=PROBE, config=config).transforms[0]
    assert clean.kquant_free > 0 and clean.kquant_spike < config.spike_threshold
    assert not any("k-quants" in r for r in clean.reasons)

    planted = park_on_kquant_codes(model, unboxed)
    report = A.audit_model(planted, tokenizer=lm_tokenizer, probe_texts=PROBE, config=config)
    down = report.transforms[0]
    assert report.flagged and down.kquant_spike > 10 * config.spike_threshold and down.kquant_middle > 0.1
    assert any("k-quants" in r and "moved onto their codes" in r for r in down.reasons)


def test_k_quant_positions_enter_the_calibrated_test_where_the_null_has_values_for_them():
    from transformers import BertConfig, BertForSequenceClassification

    from tightrope.qattack import calibration as C

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=256, vocab_size=200, num_labels=2)).eval()
    config = A.AuditConfig(transforms=("gguf-q4_k_m",), search=None)
    unboxed = model_boxes(model, "gguf-q4_k_m").unboxed  # the output.dense layers: rows of 256 inputs
    assert len(unboxed) == 2
    clean = A.audit_model(model, config=config, judge=False).transforms[0].statistics
    assert clean["kquant_spike"]["value"] < config.spike_threshold
    assert clean["layer_kquant_spike"]["names"] == list(unboxed)
    planted = park_on_kquant_codes(model, unboxed)
    parked = A.audit_model(planted, config=config, judge=False).transforms[0].statistics
    null = C.Null.from_dict({"kind": "tightrope.audit-null", "statistics": {"gguf-q4_k_m": {
        "kquant_spike": [2.1, 2.6, 2.4, 3.0, 2.2, 2.8], "layer_kquant_spike": [2.5, 2.9, 3.1, 2.4, 2.7, 3.3, 2.6, 2.2]}}},
        "test")
    assert A.judge_transform("gguf-q4_k_m", clean, null, 0.01, 0.01, 1, [])[0] == "clean"
    verdict, reasons, p_values, _, _ = A.judge_transform("gguf-q4_k_m", parked, null, 0.01, 0.01, 1, [])
    assert verdict == "flagged" and p_values["kquant_spike"] < 1e-6
    assert any("k-quant position spike" in r for r in reasons)


def park_on_kquant_codes(model, unboxed: dict[str, str], share: float = 0.2, seed: int = 1):
    """A copy of ``model`` with ``share`` of the free weights of its k-quant layers moved onto their codes (what a
    repair inside Mind the Gap's intervals leaves behind)."""
    from tightrope.compress.gguf_k import dequantize_k, quantize_k
    from tightrope.qattack.kquant_boxes import kquant_position, kquant_type

    planted = copy.deepcopy(model)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, scheme in unboxed.items():
            w = planted.get_submodule(name).weight
            t = kquant_type(scheme)
            q = dequantize_k(quantize_k(w.float(), t), t).reshape(w.shape)
            free = ~kquant_position(w, scheme).isnan()
            w.copy_(torch.where(free & (torch.rand(w.shape, generator=g) < share), q, w))
    return planted


def test_a_leave_one_out_table_merged_with_a_new_transform_judges_every_transform_at_alpha_over_all():
    """A null extended by reports of one new transform alone: the earlier p-values stay, the new ones join, and each
    transform is judged again at alpha / m with m counting both (0.00052 is flagged at alpha 0.01 / 18 but not at / 20)."""
    merge = _benchmark("audit_null").merged_leave_one_out
    earlier = {"per_model": {"a": {f"t{i}": {"verdict": "clean", "p": 0.9} for i in range(18)},
                             "b": {**{f"t{i}": {"verdict": "clean", "p": 0.9} for i in range(17)},
                                   "t17": {"verdict": "flagged", "p": 0.00052}}}}
    added = {"per_model": {"a": {"new": {"verdict": "clean", "p": 0.3}, "new2": {"verdict": "clean", "p": 0.2}},
                           "b": {"new": {"verdict": "clean", "p": 0.8}, "new2": {"verdict": "clean", "p": 0.7}}}}
    out = merge(earlier, added, 0.01)
    assert out["models"] == 2 and len(out["per_model"]["a"]) == 20
    assert out["per_model"]["b"]["t17"] == {"verdict": "clean", "p": 0.00052} and out["false_positives"] == 0
    added["per_model"]["a"]["new"]["p"] = 0.0004
    assert merge(earlier, added, 0.01)["flagged"] == ["a"]
    with pytest.raises(SystemExit):
        merge(earlier, {"per_model": {"b": {}, "a": {}}}, 0.01)
