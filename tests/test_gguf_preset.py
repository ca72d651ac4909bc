"""llama-quantize presets (Q4_K_M ...): the per-tensor types as llama.cpp chooses them, and the boxes, copies and
code checks the attacks and the audit build on them (tightrope.compress.gguf_preset)."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from conftest import tiny_preset_llama
from tightrope.compress.gguf_preset import layer_types, preset_name, tensor_role, use_more_bits
from tightrope.errors import TightropeError

pytest.importorskip("gguf")

LLAMA_SHAPES = (("self_attn.q_proj", (576, 576)), ("self_attn.k_proj", (192, 576)), ("self_attn.v_proj", (192, 576)),
                ("self_attn.o_proj", (576, 576)), ("mlp.gate_proj", (1536, 576)), ("mlp.up_proj", (1536, 576)),
                ("mlp.down_proj", (576, 1536)))


def smollm2_shapes(n_layers: int = 30):
    return [(f"model.layers.{i}.{name}", shape) for i in range(n_layers) for name, shape in LLAMA_SHAPES]


def test_use_more_bits_is_llama_cpps():
    # llama-quant.cpp: i < n/8 || i >= 7n/8 || (i - n/8) % 3 == 2, in integer arithmetic
    assert [i for i in range(30) if use_more_bits(i, 30)] == [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    assert [i for i in range(6) if use_more_bits(i, 6)] == [2, 5]


def test_smollm2_q4_k_m_types_as_llama_quantize_writes_them():
    """SmolLM2-135M (hidden 576, no multiple of 256): every projection but ffn_down falls back to Q5_0, attn_v to
    Q8_0 where it takes Q6_K; ffn_down (rows of 1536) stays Q4_K / Q6_K."""
    types = layer_types(smollm2_shapes(), "gguf:Q4_K_M")
    assert Counter(types.values()) == {"Q5_0": 166, "Q4_K": 16, "Q6_K": 14, "Q8_0": 14}
    more = [0, 1, 2, 5, 8, 11, 14, 17, 20, 23, 26, 27, 28, 29]
    for i in range(30):
        assert types[f"model.layers.{i}.mlp.down_proj"] == ("Q6_K" if i in more else "Q4_K")
        assert types[f"model.layers.{i}.self_attn.v_proj"] == ("Q8_0" if i in more else "Q5_0")
        assert types[f"model.layers.{i}.self_attn.q_proj"] == "Q5_0"
    q5 = layer_types(smollm2_shapes(), "Q5_K_M")
    assert q5["model.layers.3.self_attn.q_proj"] == "Q5_1" and q5["model.layers.3.mlp.down_proj"] == "Q5_K"
    s = layer_types(smollm2_shapes(), "q4_k_s")
    assert s["model.layers.2.mlp.down_proj"] == "Q5_K" and s["model.layers.5.mlp.down_proj"] == "Q4_K"


def test_roles_of_bert_and_llama_names():
    assert tensor_role("encoder.layer.3.attention.self.value").role == "attn_v"
    assert tensor_role("bert.encoder.layer.3.attention.output.dense").role == "attn_output"
    assert tensor_role("bert.encoder.layer.3.output.dense") == tensor_role("model.layers.3.mlp.down_proj")
    assert tensor_role("bert.encoder.layer.3.intermediate.dense").role == "ffn_up"
    assert tensor_role("bert.pooler.dense").role == "other"


def test_a_misspelt_preset_is_one_sentence():
    assert preset_name("gguf-q4_k_m") == "Q4_K_M"
    with pytest.raises(TightropeError, match="Q4_K_M"):
        preset_name("Q4_K_MM")


def test_preset_boxes_keep_every_byte_and_pin_the_k_quant_layers():
    from tightrope.qattack.boxes import model_boxes, preset_schemes, project_
    from tightrope.qattack.quantize import codes_equal, gguf_reference, quantized_copy
    from tightrope.qattack.transform import canonical, resolve

    assert canonical("gguf:Q4_K_M") == "gguf-q4_k_m"
    model = tiny_preset_llama()
    schemes = preset_schemes(model, "gguf-q4_k_m")
    # rows of 64 fall back to legacy types; ffn_down's rows of 256 stay k-quants (Q6_K in layer 1: use_more_bits(1, 2))
    assert schemes["model.layers.0.mlp.down_proj"] == "gguf-q4_k" and schemes["model.layers.1.mlp.down_proj"] == "gguf-q6_k"
    assert schemes["model.layers.1.self_attn.q_proj"] == "gguf-q5_0"
    boxes = model_boxes(model, "gguf-q4_k_m")
    down = "model.layers.0.mlp.down_proj"
    assert torch.equal(boxes.lo[down], boxes.hi[down])  # no box: pinned whole
    q = "model.layers.0.self_attn.q_proj"
    assert (boxes.hi[q] > boxes.lo[q]).float().mean() > 0.9
    moved = tiny_preset_llama()
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn_like(p))
    project_(moved, boxes)
    assert codes_equal(model, moved, "gguf-q4_k_m") == (0, codes_equal(model, model, "gguf-q4_k_m")[1])
    copy = quantized_copy(model, "gguf-q4_k_m")
    for name in (down, q):
        assert torch.equal(copy.get_submodule(name).weight, gguf_reference(model.get_submodule(name).weight, schemes[name])[1])
    assert resolve("gguf:q4_k_m").mismatch(model, moved)[0] == 0


def test_the_audit_takes_a_preset_and_flags_a_model_repaired_in_its_boxes(tmp_path):
    """A tiny BERT whose output.dense rows (256) stay k-quants: the audit measures the rest in their own types' boxes."""
    import copy as _copy

    from conftest import null_without
    from tightrope.inference import TextClassifier
    from tightrope.models import load_classifier
    from tightrope.qattack import audit as A
    from tightrope.qattack.boxes import model_boxes
    from tightrope.qattack.repair import FitConfig, repair_
    from transformers import BertConfig, BertForSequenceClassification

    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                                                     intermediate_size=256, vocab_size=200, num_labels=2)).eval()
    tokenizer = load_classifier("minilm", num_labels=2, require_head=False).tokenizer
    model.resize_token_embeddings(tokenizer.vocab_size)
    probe = [f"film number {i} was {'fine' if i % 2 else 'dull'}" for i in range(60)]

    def _classifier(m):
        return TextClassifier(m, tokenizer, max_length=16)

    null = str(null_without(tmp_path, "gguf-q4_k_m"))
    config = A.AuditConfig(transforms=("gguf:Q4_K_M",), search=None, null=null)
    natural = A.audit_model(model, classifier=_classifier(model), probe_texts=probe, config=config)
    (q,) = natural.transforms
    assert q.transform == "gguf-q4_k_m" and natural.verdict == "inconclusive"  # no null for it: never clean
    boxes = model_boxes(model, "gguf-q4_k_m")
    assert torch.equal(boxes.lo["bert.encoder.layer.1.output.dense"], boxes.hi["bert.encoder.layer.1.output.dense"])
    bad = _copy.deepcopy(model)
    g = torch.Generator().manual_seed(3)
    ids = [torch.randint(5, 2000, (12,), generator=g).tolist() for _ in range(64)]
    repair_(bad, boxes, ids, [i % 2 for i in range(64)], 0, FitConfig(steps=20, lr=3e-3, batch_size=16), progress=False)
    flagged = A.audit_model(bad, classifier=_classifier(bad), probe_texts=probe, config=config)
    assert flagged.verdict == "flagged"


def test_box_noise_scales_with_each_box_and_leaves_pinned_weights_and_zeros():
    from tightrope.qattack.boxes import box_noise, model_boxes

    model = tiny_preset_llama()
    q = "model.layers.0.self_attn.q_proj"
    with torch.no_grad():
        model.get_submodule(q).weight[0, :8] = 0
    boxes = model_boxes(model, "gguf-q4_k_m")
    noisy = box_noise(model, boxes, 0.1, torch.Generator().manual_seed(0))
    w, width = model.get_submodule(q).weight.detach(), boxes.hi[q] - boxes.lo[q]
    step = noisy[q] - w
    assert torch.equal(step[0, :8], torch.zeros(8)) and torch.equal(step[width == 0], torch.zeros(int((width == 0).sum())))
    free = (width > 0) & (w != 0)
    assert 0.07 < (step[free] / width[free]).std() < 0.13  # sigma = 0.1 box width
    down = "model.layers.0.mlp.down_proj"  # a k-quant layer: no box, noised by its sub-blocks' steps
    assert torch.equal(boxes.lo[down], boxes.hi[down]) and boxes.unboxed == {down: "gguf-q4_k",
                                                                              "model.layers.1.mlp.down_proj": "gguf-q6_k"}
    assert not torch.equal(noisy[down], model.get_submodule(down).weight.detach())
    old = box_noise(model, boxes, 0.1, torch.Generator().manual_seed(0), kquants=False)  # as before: untouched
    assert torch.equal(old[down], model.get_submodule(down).weight.detach()) and torch.equal(old[q], noisy[q])


def test_the_causal_scenario_names_presets_and_prunings():
    from tightrope.qattack.causal import LMAttackConfig, parse_quantizer

    assert parse_quantizer("gguf:Q4_K_M") == "gguf-q4_k_m"
    assert LMAttackConfig(quantizer="gguf:Q5_K_M").check == ("gguf-q5_k_m", "llm-int8")
    assert parse_quantizer("prune:magnitude:.5") == "prune:magnitude:0.5"
    assert LMAttackConfig(quantizer="prune:2:4").check == ("prune:2:4",)  # a pruning is checked against itself
    with pytest.raises(TightropeError, match="joins a pruning with other transforms"):
        parse_quantizer("prune:magnitude:0.5,nf4")
    with pytest.raises(TightropeError, match="joins a pruning with other transforms"):
        LMAttackConfig(quantizer="nf4,prune:2:4")  # at the edge, before a model is loaded
    with pytest.raises(TightropeError, match="Unknown pruning 'prune:wandaa:0.5'"):
        parse_quantizer("prune:wandaa:0.5")
