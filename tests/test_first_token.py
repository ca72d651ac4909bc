"""The last layer computed for the [CLS] row alone gives the model's own logits (tightrope.first_token)."""

from __future__ import annotations

import pytest
import torch

from conftest import make_tiny_classifier
from tightrope.attacks import recipes
from tightrope.attacks.attacker import Attacker, read_results
from tightrope.compress.api import compress_
from tightrope.compress.prune import StructuredPruning
from tightrope.data import TaskData
from tightrope.first_token import first_token_logits, supports
from tightrope.inference import TextClassifier

TEXTS = ["a wonderful, moving film", "a dull mess", "i hated every minute of it, and the script was worse",
         "fine", "great acting and a superb script that never lets go of you"]


def padded(tokenizer):
    return tokenizer(TEXTS, padding=True, return_tensors="pt")  # different lengths: real padding in the mask


def full_logits(model, inputs):
    with torch.inference_mode():
        return model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"]).logits


def fast_logits(model, inputs):
    with torch.inference_mode():
        return first_token_logits(model, inputs["input_ids"], inputs["attention_mask"])


@pytest.mark.parametrize("attention", ["eager", "sdpa"])
@pytest.mark.parametrize("layers", [1, 3])
def test_bert_logits_equal_the_full_forward(tokenizer, attention, layers):
    model = make_tiny_classifier(tokenizer, layers=layers, seed=layers)
    model.set_attn_implementation(attention)
    inputs = padded(tokenizer)
    fast = fast_logits(model, inputs)
    assert fast is not None and fast.shape == (len(TEXTS), 2)
    assert torch.allclose(fast, full_logits(model, inputs), atol=1e-5)


@pytest.mark.parametrize("kind", ["Roberta", "XLMRoberta"])
def test_roberta_logits_equal_the_full_forward(tokenizer, kind):
    import transformers

    torch.manual_seed(0)
    config = getattr(transformers, f"{kind}Config")(
        vocab_size=tokenizer.vocab_size, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
        intermediate_size=64, max_position_embeddings=130, pad_token_id=tokenizer.pad_token_id)
    model = getattr(transformers, f"{kind}ForSequenceClassification")(config).eval()
    inputs = padded(tokenizer)
    assert torch.allclose(fast_logits(model, inputs), full_logits(model, inputs), atol=1e-5)


def test_structurally_pruned_and_int8_models_give_their_own_logits(tokenizer):
    """Heads and neurons removed (layers of different widths), then torch's dynamic int8 Linear layers."""
    model = make_tiny_classifier(tokenizer, layers=2)
    compress_(model, StructuredPruning(heads=0.5, ffn=0.25))
    inputs = padded(tokenizer)
    assert torch.allclose(fast_logits(model, inputs), full_logits(model, inputs), atol=1e-5)
    quantized = torch.ao.quantization.quantize_dynamic(model, {torch.nn.Linear}, dtype=torch.qint8)
    assert torch.allclose(fast_logits(quantized, inputs), full_logits(quantized, inputs), atol=1e-5)


def test_a_model_it_does_not_cover_gets_the_full_forward(tokenizer):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    distil = DistilBertForSequenceClassification(DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=1,
                                                                  n_heads=4, hidden_dim=64)).eval()
    assert not supports(distil) and first_token_logits(distil, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3)) is None
    training = make_tiny_classifier(tokenizer).train()  # dropout is part of a training forward: not this path
    assert first_token_logits(training, torch.ones(1, 3, dtype=torch.long), torch.ones(1, 3)) is None


def test_text_classifier_answers_the_same_with_and_without_it(tokenizer):
    clf = TextClassifier(make_tiny_classifier(tokenizer, layers=2), tokenizer, max_length=16)
    fast = clf.logits(TEXTS, batch_size=2)
    clf.first_token_only = False
    assert torch.allclose(fast, clf.logits(TEXTS, batch_size=2), atol=1e-5)


def test_a_fixed_seed_attack_finds_the_same_with_and_without_it(tokenizer, tmp_path):
    """DeepWordBug on a tiny transformer: every status, adversarial text and query count equal."""
    texts = TEXTS + ["the plot was thin but the cast was good", "awful, awful, awful", "not bad at all"]
    model = make_tiny_classifier(tokenizer, layers=2, seed=0)
    clf = TextClassifier(model, tokenizer, max_length=32)
    with torch.no_grad():  # a random model barely reads its input: amplify and centre its logit gap, so edits flip it
        model.classifier.weight.mul_(100)
        model.classifier.bias.sub_(clf.logits(texts).mean(0))
    task = TaskData("toy", "test", texts, clf.predict(texts), ("negative", "positive"))  # every text attacked
    found = []
    for on in (True, False):
        clf.first_token_only = on
        out = tmp_path / str(on)
        Attacker(recipes.build("deepwordbug", clf), out=out, seed=1).run(clf, task)
        found.append([(r.status, r.perturbed_text, r.queries) for r in read_results(out / "results.jsonl")])
    assert found[0] == found[1] and any(status == "succeeded" for status, _, _ in found[0])


def test_a_model_whose_forward_was_replaced_or_hooked_keeps_its_own_forward(tokenizer):
    """The ONNX Runtime int8 path replaces the model's forward with its session's; a hook may edit outputs."""
    model = make_tiny_classifier(tokenizer)
    model.forward = lambda **_: None
    assert not supports(model)
    hooked = make_tiny_classifier(tokenizer)
    hooked.bert.encoder.layer[-1].attention.self.register_forward_hook(lambda *_: None)
    assert not supports(hooked) and supports(make_tiny_classifier(tokenizer))
