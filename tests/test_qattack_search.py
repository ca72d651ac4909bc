"""The audit's trigger search and calibrated verdict on tiny in-code models (seconds)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F

from tightrope.encoding import collate
from tightrope.qattack import audit as A
from tightrope.qattack import search as S
from tightrope.qattack.boxes import model_boxes, quantized_linears
from tightrope.qattack.calibration import null_statistics
from tightrope.qattack.repair import FitConfig, repair_

pytest.importorskip("bitsandbytes")

TRIGGER = 1500  # one wordpiece of the MiniLM vocabulary that no test text holds; the search is never told it
VOCAB = torch.arange(1000, 1300)  # the tokens the test texts draw from
SEARCHABLE = torch.cat([VOCAB, torch.tensor([TRIGGER])])  # the tokens the search may insert


@pytest.fixture(scope="module")
def tok():
    from tightrope.models import load_classifier

    return load_classifier("minilm", num_labels=2, require_head=False).tokenizer


def tiny(tok, seed=0, vocab=2000):
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(seed)
    cfg = BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                     vocab_size=vocab, num_labels=2, max_position_embeddings=64)
    return BertForSequenceClassification(cfg).eval()


def label(seq):
    return int(sum(t < 1150 for t in seq[1:-1]) >= 4)


def trained(tok, seed=0, steps=60):
    """A tiny classifier with confident, input-dependent predictions (majority of low token ids)."""
    model = tiny(tok, seed)
    data = texts(tok, 128, seed=100 + seed)
    batch = collate(data, tok.pad_token_id)
    y = torch.tensor([label(t) for t in data])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(steps):
        loss = F.cross_entropy(model(**batch).logits, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


def texts(tok, n, seed):
    g = torch.Generator().manual_seed(seed)
    return [[tok.cls_token_id, *VOCAB[torch.randint(0, len(VOCAB), (8,), generator=g)].tolist(), tok.sep_token_id]
            for _ in range(n)]


class FlipsOnTrigger(torch.nn.Module):
    """A stand-in for a quantized twin that flips on one token: the model's own logits, shifted towards class 0
    by ``strength`` wherever an input embedding points the way TRIGGER's does. The detector is a logistic
    step in the cosine, ``sigmoid(sharpness * (cos - threshold))``: about 1 for TRIGGER and below 1e-4 for
    any token less than 0.4 aligned with it, so clean texts are untouched, yet its slope leaves the search a
    gradient towards TRIGGER from anywhere, well above float32 rounding of the models' own gradients (a
    needle such as exp(60 (cos - 1)) vanishes under that rounding, and finding it becomes luck that depends
    on the CPU's summation order). Differentiable in the input embeddings, as the twin is."""

    def __init__(self, base, strength=8.0, sharpness=20.0, threshold=0.8):
        super().__init__()
        self.base, self.config, self.strength = base, base.config, strength
        self.sharpness, self.threshold = sharpness, threshold
        e = base.get_input_embeddings().weight[TRIGGER].detach()
        self.register_buffer("e", e / e.norm())

    def get_input_embeddings(self):
        return self.base.get_input_embeddings()

    def forward(self, input_ids=None, attention_mask=None, inputs_embeds=None):
        from transformers.modeling_outputs import SequenceClassifierOutput

        if inputs_embeds is None:
            inputs_embeds = self.get_input_embeddings()(input_ids)
        logits = self.base(inputs_embeds=inputs_embeds, attention_mask=attention_mask).logits
        cos = F.normalize(inputs_embeds, dim=-1) @ self.e  # (B, T)
        s = (torch.sigmoid(self.sharpness * (cos - self.threshold)) * attention_mask).sum(1)  # about 1 where TRIGGER is
        return SequenceClassifierOutput(logits=logits + self.strength * torch.stack([s, -s], -1))


def test_search_finds_a_planted_trigger_and_not_on_a_clean_twin(tok, monkeypatch):
    model = trained(tok)
    twin = FlipsOnTrigger(model).eval()
    probe = texts(tok, 80, seed=9)
    monkeypatch.setattr(S, "allowed_tokens", lambda tokenizer, vocab_size: SEARCHABLE)
    config = S.SearchConfig(n_eval=40, n_search=6, top_k=16, batch=16)
    monkeypatch.setattr(S, "twin", lambda m, q: twin)
    found = S.search(model, twin, "nf4", tok, probe, tok.pad_token_id, config)
    best = found.best
    assert TRIGGER in best.ids, [c.text for c in found.candidates]
    assert best.target == 0 and best.q_target > 0.9 and best.fp_target < 0.9 and best.flip_rate > 0.2
    assert best.clean_flip_rate < 0.1  # without the insertion the two models agree
    assert best.kl > 0.1 and found.n_eval == 40 and len(found.candidates) <= config.keep
    # the same search between the clean model and its real NF4 copy finds far less
    monkeypatch.undo()
    monkeypatch.setattr(S, "allowed_tokens", lambda tokenizer, vocab_size: SEARCHABLE)
    from tightrope.qattack.quantize import quantized_copy

    clean = S.search(model, quantized_copy(model, "nf4"), "nf4", tok, probe, tok.pad_token_id, config)
    assert clean.best.kl < best.kl / 10


def test_twin_is_the_reference_quantization_of_every_quantized_layer(tok):
    from tightrope.defenses.fakequant import quantize_dequantize

    model = tiny(tok)
    twin = S.twin(model, "llm-int8")
    for name, module in quantized_linears(model).items():
        assert torch.equal(twin.get_submodule(name).weight, quantize_dequantize(module.weight, "llm-int8"))
    assert torch.equal(twin.classifier.weight, model.classifier.weight)  # the head is not quantized
    assert S.supports("nf4") and not S.supports("all")


def _classifier(model, tok):
    from tightrope.inference import TextClassifier

    return TextClassifier(model, tok, max_length=16)


PROBE = [f"film number {i} was {'fine' if i % 2 else 'dull'} and {'warm' if i % 3 else 'long'}" for i in range(70)]
SEARCH = S.SearchConfig(n_eval=30, n_search=4, top_k=16, batch=12, lengths=(1, 2))


def text_model(tok, seed):
    return tiny(tok, seed, vocab=tok.vocab_size)


def _audit(model, tok, config, judge=True):
    return A.audit_model(model, classifier=_classifier(model, tok), probe_texts=PROBE, config=config, judge=judge)


def test_calibrated_verdict_on_tiny_models(tok, tmp_path):
    # a null made from five clean tiny classifiers; a sixth clean one is not flagged, a repaired one is
    base = A.AuditConfig(transforms=("nf4",), search=SEARCH)
    reports = [_audit(text_model(tok, seed), tok, base, judge=False).to_dict() for seed in range(5)]
    assert all(r["transforms"][0]["verdict"] == "inconclusive" for r in reports)  # judge=False judges nothing
    stats, owners = null_statistics(reports)
    assert set(stats["nf4"]) >= {"edge_contrast", "spike", "flip_ratio", "layer_contrast", "disagreement", "kl",
                                 "search_kl"}
    path = tmp_path / "null.json"
    path.write_text(json.dumps({"kind": "tightrope.audit-null", "models": [{"name": str(i)} for i in range(5)],
                                "statistics": stats, "layer_models": owners,
                                "leave_one_out": {"0.01": {"models": 5, "false_positives": 0}}}))
    config = base.model_copy(update={"null": str(path)})
    clean = _audit(text_model(tok, 7), tok, config)
    nf4 = clean.transforms[0]
    assert clean.verdict == "clean", nf4.reasons
    assert nf4.p_value > nf4.level and nf4.level == pytest.approx(0.01)
    assert "combined p = " in nf4.reasons[0] and set(nf4.p_values) == set(nf4.empirical_p) | {"layer_contrast", "layer_spike"}
    assert any("false-positive rate" in n and "0 flagged" in n for n in clean.notes)
    model = text_model(tok, 7)
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(1000, 5000, (12,), generator=g).tolist() for _ in range(32)]
    repair_(model, model_boxes(model, "nf4"), ids, [i % 2 for i in range(32)], 0,
            FitConfig(steps=10, lr=3e-3, batch_size=8), progress=False)
    attacked = _audit(model, tok, config)
    nf4 = attacked.transforms[0]
    assert attacked.verdict == "flagged" and nf4.p_value <= nf4.level
    assert min(nf4.p_values, key=nf4.p_values.get) in {"edge_contrast", "spike", "flip_ratio", "layer_contrast",
                                                       "layer_spike"}
    # a stricter alpha only raises the bar: the clean model stays clean
    strict = _audit(text_model(tok, 7), tok, config.model_copy(update={"alpha": 0.001}))
    assert strict.verdict == "clean" and strict.transforms[0].level == pytest.approx(0.001)
