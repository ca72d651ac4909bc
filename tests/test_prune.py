"""Pruning: exact sparsity, N:M patterns, structured shrinkage, save / reload, held sparsity, errors.

Every model here is tiny (2 layers, hidden 32, 4 heads of 8, FFN 64) and built in code.
"""

from __future__ import annotations

import pytest
import torch
from conftest import POSITIVE, NEGATIVE, make_tiny_classifier
from torch import nn

from tightrope.compress.api import compress_, count_parameters
from tightrope.compress.formats import load_pruned, save_pruned
from tightrope.compress.prune import MagnitudePruning, SemiStructured24, StructuredPruning, Wanda
from tightrope.compress.recovery import SparsityMask, hold_sparsity, recover
from tightrope.compress.structured import gate_taylor, head_l1, kept_indices, n_removed
from tightrope.compress.wanda import input_norms, nm_keep_mask, row_keep_mask, set_tokenizer, wanda_scores
from tightrope.errors import TightropeError

TEXTS = POSITIVE + NEGATIVE
ENCODER = ("query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense")


def make_tiny_mpnet(tokenizer, seed: int = 0):
    from transformers import MPNetConfig, MPNetForSequenceClassification

    torch.manual_seed(seed)
    config = MPNetConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                         intermediate_size=64, max_position_embeddings=128, num_labels=2)
    model = MPNetForSequenceClassification(config).eval()
    with torch.no_grad():  # a bias large enough to matter, so keeping the wrong heads of it shows
        model.mpnet.encoder.relative_attention_bias.weight.normal_(0.0, 3.0)
    return model


def make_tiny_roberta(tokenizer, seed: int = 0):
    from transformers import RobertaConfig, RobertaForSequenceClassification

    torch.manual_seed(seed)
    config = RobertaConfig(vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=64, max_position_embeddings=130, num_labels=2)
    return RobertaForSequenceClassification(config).eval()


MAKERS = pytest.mark.parametrize("maker", [make_tiny_classifier, make_tiny_mpnet, make_tiny_roberta],
                                 ids=["bert", "mpnet", "roberta"])


def encoder_linears(model) -> dict[str, nn.Linear]:
    return {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear) and ".layer." in n}


def batch(tokenizer, texts=TEXTS):
    return tokenizer(list(texts), padding=True, return_tensors="pt")


@torch.no_grad()
def logits(model, inputs):
    return model(**inputs).logits


# --- unstructured magnitude -----------------------------------------------------------------------


def test_global_magnitude_hits_the_exact_share_and_cuts_the_smallest(tokenizer):
    model = make_tiny_classifier(tokenizer)
    before = {n: m.weight.detach().clone() for n, m in encoder_linears(model).items()}
    summary = compress_(model, MagnitudePruning(sparsity=0.3, scope="global"))
    layers = encoder_linears(model)
    total = sum(w.numel() for w in before.values())
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    assert zeros == round(0.3 * total)
    assert set(summary.modules) == set(layers)
    # One threshold T: every removed weight was no larger in magnitude than every kept one.
    cut = torch.cat([before[n][m.weight == 0].abs() for n, m in layers.items()])
    kept = torch.cat([before[n][m.weight != 0].abs() for n, m in layers.items()])
    assert cut.max() <= kept.min()
    assert summary.nonzero_parameters == count_parameters(model)[1]
    assert any("no faster" in note for note in summary.notes)
    # Permanent: no mask, no re-parametrisation, and the head stays dense.
    assert not any("weight_orig" in k or "weight_mask" in k for k in model.state_dict())
    assert all(not m._forward_pre_hooks for m in layers.values())
    assert int((model.classifier.weight == 0).sum()) == 0


def test_layer_magnitude_prunes_each_layer_to_the_share(tokenizer):
    model = make_tiny_classifier(tokenizer)
    summary = compress_(model, MagnitudePruning(sparsity=0.3, scope="layer"))
    for name, m in encoder_linears(model).items():
        assert int((m.weight == 0).sum()) == round(0.3 * m.weight.numel())
        assert summary.per_module_sparsity[name] == pytest.approx(round(0.3 * m.weight.numel()) / m.weight.numel())


def test_include_exclude_choose_the_modules(tokenizer):
    model = make_tiny_classifier(tokenizer)
    summary = compress_(model, MagnitudePruning(sparsity=0.5, include=("*.intermediate.dense",), exclude=("*.layer.1.*",)))
    assert summary.modules == ["bert.encoder.layer.0.intermediate.dense"]
    assert int((model.bert.encoder.layer[1].intermediate.dense.weight == 0).sum()) == 0


# --- Wanda and N:M --------------------------------------------------------------------------------


def test_wanda_score_prefers_strong_inputs_over_large_weights():
    w = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    scores = wanda_scores(w, torch.tensor([10.0, 1.0]))  # Eq. 1: |W| * ||X||
    assert torch.equal(scores, torch.tensor([[10.0, 2.0], [30.0, 4.0]]))
    assert torch.equal(row_keep_mask(scores, 0.5), torch.tensor([[True, False], [True, False]]))
    assert torch.equal(row_keep_mask(w.abs(), 0.5), torch.tensor([[False, True], [False, True]]))  # magnitude differs


def test_input_norms_count_real_tokens_only(tokenizer):
    model = make_tiny_classifier(tokenizer)
    inputs = batch(tokenizer, ["short", "a much longer sentence than the first one"])
    assert not inputs["attention_mask"].all()  # there is padding to leave out
    query = model.bert.encoder.layer[0].attention.self.query
    norms = input_norms(model, {"q": query}, [dict(inputs)])["q"]
    with torch.no_grad():
        x = model.bert(**inputs, output_hidden_states=True).hidden_states[0]  # input of layer 0: (B, T, C)
    expected = x[inputs["attention_mask"].bool()].pow(2).sum(0).sqrt()
    assert torch.allclose(norms, expected, rtol=1e-5)


def test_wanda_prunes_every_row_to_the_share(tokenizer):
    model = set_tokenizer(make_tiny_classifier(tokenizer), tokenizer)
    summary = compress_(model, Wanda(sparsity=0.5, calibration_texts=TEXTS, n_calibration=8))
    for m in encoder_linears(model).values():
        per_row = (m.weight == 0).sum(1)
        assert torch.all(per_row == round(0.5 * m.in_features))
    assert summary.config["calibration_texts"] == "12 texts"


def test_wanda_reads_a_task_for_calibration(tokenizer, tiny_model_dir, tiny_task):
    model = load_pruned(tiny_model_dir).model  # tokenizer found beside the weights
    compress_(model, Wanda(sparsity=0.25, calibration_texts=str(tiny_task), n_calibration=6))
    m = model.bert.encoder.layer[1].output.dense
    assert torch.all((m.weight == 0).sum(1) == round(0.25 * m.in_features))


@pytest.mark.parametrize("criterion", ["magnitude", "wanda"])
def test_two_four_holds_in_every_group(tokenizer, criterion):
    model = set_tokenizer(make_tiny_classifier(tokenizer), tokenizer)
    summary = compress_(model, SemiStructured24(criterion=criterion, calibration_texts=TEXTS))
    for m in encoder_linears(model).values():
        groups = (m.weight != 0).reshape(m.out_features, -1, 4).sum(-1)
        assert torch.all(groups == 2)
    assert all(s == pytest.approx(0.5) for s in summary.per_module_sparsity.values())


def test_nm_mask_keeps_the_largest_of_each_group():
    scores = torch.tensor([[4.0, 1.0, 3.0, 2.0, 0.0, 9.0, 8.0, 7.0]])
    assert nm_keep_mask(scores, 2, 4).tolist() == [[True, False, True, False, False, True, True, False]]


# --- structured -----------------------------------------------------------------------------------


def expected_removed(hidden: int, head_size: int, heads_removed: int, ffn_removed: int, layers: int) -> int:
    attention = heads_removed * head_size * (3 * (hidden + 1) + hidden)  # q, k, v rows + biases; o columns
    ffn = ffn_removed * ((hidden + 1) + hidden)  # intermediate rows + biases; output columns
    return layers * (attention + ffn)


@MAKERS
def test_structured_pruning_shrinks_by_the_expected_count(tokenizer, maker):
    model = maker(tokenizer)
    inputs = batch(tokenizer)
    before = count_parameters(model)[0]
    summary = compress_(model, StructuredPruning(heads=0.5, ffn=0.25))
    assert before - summary.parameters == expected_removed(32, 8, 2, 16, 2)
    assert logits(model, inputs).shape == (len(TEXTS), 2)
    plan = model.config.tightrope_structure["layers"]
    assert [len(layer["heads"]) for layer in plan] == [2, 2] and [layer["ffn"] for layer in plan] == [48, 48]


@MAKERS
@pytest.mark.parametrize("criterion", ["magnitude", "taylor"])
def test_removing_units_equals_silencing_them(tokenizer, maker, criterion):
    """A pruned head or neuron contributes nothing: zeroing its output columns in the full model is the same."""
    model = maker(tokenizer)
    reference = maker(tokenizer)
    set_tokenizer(model, tokenizer)
    inputs = batch(tokenizer)
    compress_(model, StructuredPruning(heads=0.3, ffn=0.3, criterion=criterion, calibration_texts=TEXTS, n_calibration=4))
    attention_out = "attention.attn.o" if model.config.model_type == "mpnet" else "attention.output.dense"
    pairs = zip(reference.base_model.encoder.layer, model.base_model.encoder.layer, model.config.tightrope_structure["layers"])
    with torch.no_grad():
        for full, pruned, plan in pairs:
            for h in set(range(4)) - set(plan["heads"]):
                full.get_submodule(attention_out).weight[:, h * 8 : (h + 1) * 8] = 0
            kept = kept_rows(full.intermediate.dense.weight, pruned.intermediate.dense.weight)
            assert len(kept) == plan["ffn"]
            for j in set(range(64)) - kept:
                full.output.dense.weight[:, j] = 0
    assert torch.allclose(logits(model, inputs), logits(reference, inputs), atol=1e-5)
    with torch.no_grad():
        hidden, hidden_ref = (m.base_model(**inputs).last_hidden_state for m in (model, reference))
    assert torch.allclose(hidden, hidden_ref, atol=1e-4)


def kept_rows(full: torch.Tensor, pruned: torch.Tensor) -> set[int]:
    """Indices of the rows of ``full`` that survive in ``pruned``."""
    return {int(torch.nonzero((full == row).all(1))[0]) for row in pruned}


def test_zero_structured_pruning_changes_nothing(tokenizer):
    model, reference = make_tiny_classifier(tokenizer), make_tiny_classifier(tokenizer)
    inputs = batch(tokenizer)
    summary = compress_(model, StructuredPruning(heads=0.0, ffn=0.0))
    assert summary.parameters == count_parameters(reference)[0]
    assert torch.equal(logits(model, inputs), logits(reference, inputs))


def test_a_layer_always_keeps_one_head_and_one_neuron():
    assert n_removed(0.99, 4) == 3 and n_removed(0.3, 12) == 4 and n_removed(0.0, 12) == 0
    assert kept_indices(torch.tensor([3.0, 1.0, 2.0, 0.5]), 2).tolist() == [0, 2]


def test_head_scores_by_hand():
    q = torch.zeros(4, 2)
    q[2:] = 1.0  # head 1 of two heads of size 2 has the larger rows
    o = torch.zeros(2, 4)
    assert head_l1(q, q, q, o, 2).tolist() == [0.0, 12.0]
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    g = torch.tensor([[1.0, -1.0, 1.0, 1.0]])
    assert gate_taylor(w, g, 2).tolist() == [1.0, 7.0]  # |1 - 2|, |3 + 4|


@pytest.mark.parametrize("maker", [make_tiny_classifier, make_tiny_mpnet], ids=["bert", "mpnet"])
def test_structured_model_saves_and_reloads_with_identical_logits(tokenizer, maker, tmp_path):
    from tightrope import inference

    model = maker(tokenizer)
    compress_(model, StructuredPruning(heads=0.5, ffn=0.5))
    inputs = batch(tokenizer)
    out = save_pruned(model, tokenizer, tmp_path / "pruned", card={"tokenization": {"max_length": 64}})
    reloaded = load_pruned(out).model
    assert count_parameters(reloaded) == count_parameters(model)
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))
    clf = inference.load(str(out))  # through the registered "pruned-structured" format
    assert clf.card["format"] == "pruned-structured" and clf.max_length == 64
    assert torch.allclose(clf.logits(TEXTS[:3]), logits(model, batch(tokenizer, TEXTS[:3])), atol=1e-5)


def test_unstructured_model_saves_and_reloads_as_plain_torch(tokenizer, tmp_path):
    from tightrope import inference

    model = make_tiny_classifier(tokenizer)
    compress_(model, MagnitudePruning(sparsity=0.4))
    out = save_pruned(model, tokenizer, tmp_path / "sparse")
    clf = inference.load(str(out))
    inputs = batch(tokenizer)
    assert torch.equal(logits(clf.model, inputs), logits(model, inputs))
    assert clf.card["compression"][0]["method"] == "MagnitudePruning"
    assert count_parameters(clf.model) == count_parameters(model)


def test_pruning_twice_composes_the_plan(tokenizer, tmp_path):
    model = make_tiny_mpnet(tokenizer)
    compress_(model, StructuredPruning(heads=0.25, ffn=0.25))
    compress_(model, StructuredPruning(heads=0.34, ffn=0.25))
    plan = model.config.tightrope_structure["layers"]
    assert all(len(layer["heads"]) == 2 and layer["ffn"] == 36 for layer in plan)
    inputs = batch(tokenizer)
    reloaded = load_pruned(save_pruned(model, tokenizer, tmp_path / "twice")).model
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


# --- bad input ------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [
    lambda: MagnitudePruning(sparsity=1.0),
    lambda: MagnitudePruning(sparsity=-0.1),
    lambda: MagnitudePruning(sparsity=0.3, scope="row"),
    lambda: MagnitudePruning(0.3),
    lambda: Wanda(sparsity=1.5),
    lambda: StructuredPruning(heads=1.0),
    lambda: StructuredPruning(ffn=0.3, criterion="random"),
    lambda: SemiStructured24(n=4, m=4),
])
def test_bad_settings_are_one_sentence(make):
    with pytest.raises(TightropeError) as err:
        make()
    message = str(err.value)
    assert message.endswith(".") and "\n" not in message


def test_pattern_matching_nothing_is_refused(tokenizer):
    with pytest.raises(TightropeError, match="match no"):
        compress_(make_tiny_classifier(tokenizer), MagnitudePruning(sparsity=0.3, include=("nothing.*",)))


def test_unsupported_architecture_and_widths(tokenizer):
    from transformers import GPT2Config, GPT2ForSequenceClassification

    gpt2 = GPT2ForSequenceClassification(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=4, num_labels=2))
    with pytest.raises(TightropeError, match="Structured pruning supports"):
        compress_(gpt2, StructuredPruning(heads=0.3))
    quantized = make_tiny_classifier(tokenizer)
    quantized.bert.encoder.layer[0].intermediate.dense = nn.Identity()  # stands in for a quantized module
    with pytest.raises(TightropeError, match="prune before quantizing"):
        compress_(quantized, StructuredPruning(heads=0.3))
    odd = nn.Sequential(nn.Linear(6, 4))
    with pytest.raises(TightropeError, match="divisible by 4"):
        compress_(odd, SemiStructured24())


def test_calibration_without_texts_or_tokenizer(tokenizer):
    with pytest.raises(TightropeError, match="calibration"):
        compress_(make_tiny_classifier(tokenizer), Wanda(sparsity=0.5))
    with pytest.raises(TightropeError, match="tokenizer"):
        compress_(make_tiny_classifier(tokenizer), Wanda(sparsity=0.5, calibration_texts=TEXTS))


# --- held sparsity and recovery -------------------------------------------------------------------


def train_a_few_steps(model, tokenizer, steps: int = 4):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2, weight_decay=0.1)
    inputs = batch(tokenizer)
    labels = torch.tensor([1] * len(POSITIVE) + [0] * len(NEGATIVE))
    model.train()
    for _ in range(steps):
        loss = nn.functional.cross_entropy(model(**inputs).logits, labels)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    model.eval()


def test_pruned_weights_stay_zero_through_training(tokenizer):
    model = make_tiny_classifier(tokenizer)
    compress_(model, MagnitudePruning(sparsity=0.5))
    mask = SparsityMask.from_model(model)
    assert mask.pruned == round(0.5 * sum(m.weight.numel() for m in encoder_linears(model).values()))
    with hold_sparsity(model, mask):
        train_a_few_steps(model, tokenizer)
    assert mask.violations(model) == 0
    kept = next(iter(encoder_linears(model).values())).weight
    assert int((kept != 0).sum()) > 0
    # Without the hold the same training fills the zeros back in (so the check above can fail).
    train_a_few_steps(model, tokenizer)
    assert mask.violations(model) > 0


def test_recover_fine_tunes_with_sparsity_held(tokenizer, tiny_task, tmp_path):
    from tightrope import inference

    model = make_tiny_classifier(tokenizer)
    compress_(model, MagnitudePruning(sparsity=0.5))
    compress_(model, StructuredPruning(heads=0.5, ffn=0.5))
    pruned = save_pruned(model, tokenizer, tmp_path / "pruned")
    mask = SparsityMask.from_model(load_pruned(pruned).model)
    card = recover(pruned, str(tiny_task), tmp_path / "recovered", steps=3, batch_size=4, lr=1e-3, progress=False)
    assert card["steps"] == 3 and card["format"] == "pruned-structured"
    clf = inference.load(str(tmp_path / "recovered"))
    assert mask.violations(clf.model) == 0
    assert count_parameters(clf.model)[0] == count_parameters(model)[0]
    assert not torch.equal(clf.model.classifier.weight, model.classifier.weight)  # it did train



# --- the real MiniLM (slow, still under a minute) -------------------------------------------------


@pytest.mark.slow
def test_minilm_structured_30_percent_round_trip(tmp_path):
    from tightrope import models

    loaded = models.load_classifier("minilm", num_labels=2, require_head=False)
    model, tokenizer = loaded.model, loaded.tokenizer
    before = count_parameters(model)[0]
    summary = compress_(model, StructuredPruning(heads=0.3, ffn=0.3))
    # 6 layers, 12 heads of 32 -> 8 kept, FFN 1536 -> 1075 kept, hidden 384.
    assert before - summary.parameters == expected_removed(384, 32, 4, 461, 6)
    inputs = batch(tokenizer, TEXTS[:4])
    reloaded = load_pruned(save_pruned(model, tokenizer, tmp_path / "minilm-pruned")).model
    assert torch.equal(logits(reloaded, inputs), logits(model, inputs))


def test_the_2_4_spelling_with_its_colon_is_a_pruning_spec():
    from tightrope.compress import prune
    from tightrope.compress.specs import prune_config

    assert isinstance(prune_config("2:4"), prune.SemiStructured24)
    assert isinstance(prune_config("24"), prune.SemiStructured24)
    assert type(prune_config("2:4")) is type(prune_config(" 2:4 "))
