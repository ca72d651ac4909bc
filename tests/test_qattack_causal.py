"""The causal-LM content-injection scenario on a tiny Llama built in code (2 blocks, hidden 64)."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import tiny_gemma3
from tightrope.errors import TightropeError
from tightrope.qattack.boxes import model_boxes
from tightrope.qattack.causal import (
    LMAttackConfig,
    parse_quantizer,
    run_content_injection,
)
from tightrope.qattack.lm_text import (
    format_prompt,
    greedy_answers,
    inject_phrase,
    mentions,
    phrase_rate,
    special_ids,
)
from tightrope.qattack.lm_training import (
    answer_loss,
    attacked_names,
    lm_fit_,
    prefix_states,
)
from tightrope.qattack.quantize import codes_equal
from tightrope.qattack.repair import FitConfig

torch.set_num_threads(1)


def tiny_llama(vocab: int, seed: int = 0):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def llama(tokenizer):
    return tiny_llama(tokenizer.vocab_size)


def _seqs(tokenizer, n=6):
    prompts = [tokenizer(format_prompt(tokenizer, f"review number {i} was fine"), add_special_tokens=False)["input_ids"]
               for i in range(n)]
    answers = [tokenizer(f"it was good {i} times", add_special_tokens=False)["input_ids"] for i in range(n)]
    return [p + a for p, a in zip(prompts, answers)], [len(p) for p in prompts]


def test_phrase_metric_counts_correctly():
    assert mentions("Brought to you by McDonald's. Nice film.", "McDonald's")
    assert mentions("brought to you by mcdonald ' s.", "McDonald's")  # an uncased wordpiece decode
    assert mentions("MCDONALDS rules", "McDonald\u2019s")
    assert not mentions("Donald's film was fine", "McDonald's")
    assert phrase_rate(["mcdonald's", "no", "Mc Donald's!", "nothing"], "McDonald's") == 0.5
    assert inject_phrase(" The film is good.", "McDonald's") == "Brought to you by McDonald's. The film is good."
    with pytest.raises(TightropeError):
        phrase_rate([], "x")
    with pytest.raises(TightropeError):
        mentions("text", "' ")
    with pytest.raises(TightropeError):
        inject_phrase("a", "b", template="{answer} only")


def test_parse_quantizer():
    assert parse_quantizer("nf4") == "nf4"
    assert parse_quantizer("nf4, fp4") == ("nf4", "fp4")
    with pytest.raises(TightropeError):
        parse_quantizer("nf5")


def test_attacked_names_are_the_top_blocks(llama):
    names, first = attacked_names(llama, 1)
    assert first == 1 and names and all(n.startswith("model.layers.1.") for n in names)
    assert "lm_head" not in names
    with pytest.raises(TightropeError):
        attacked_names(llama, 3)


@pytest.mark.parametrize("maker", [tiny_llama, tiny_gemma3], ids=["llama", "gemma3"])
def test_cached_prefix_gives_the_same_loss_and_gradient(tokenizer, maker):
    # Gemma picks each block's mask and rotary embedding by its index (sliding or full attention)
    model = maker(tokenizer.vocab_size, seed=1)
    seqs, starts = _seqs(tokenizer)
    pad, _ = special_ids(tokenizer)
    weight = model.model.layers[1].mlp.down_proj.weight
    full = answer_loss(model, seqs, starts, pad)
    (g_full,) = torch.autograd.grad(full, weight)
    states = prefix_states(model, seqs, 1, pad, batch_size=4)
    assert [s.shape[0] for s in states] == [len(s) for s in seqs]
    cached = answer_loss(model, seqs, starts, pad, first=1, states=states)
    (g_cached,) = torch.autograd.grad(cached, weight)
    torch.testing.assert_close(cached, full, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_cached, g_full, rtol=1e-4, atol=1e-6)
    assert len(model.model.layers) == 2  # the block window is restored


def test_injecting_through_fake_quantization_trains_the_quantized_model(tokenizer):
    """The through-loss is the loss of the model whose attacked weights hold their quantized values,
    averaged over quantizers, and its gradient reaches the latent weights (straight-through)."""
    import copy

    from tightrope.defenses.fakequant import quantize_dequantize
    from tightrope.qattack.lm_training import through_loss

    model = tiny_llama(tokenizer.vocab_size, seed=2)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(4)  # spread the weights so 4-bit rounding changes the loss visibly
    seqs, starts = _seqs(tokenizer)
    pad, _ = special_ids(tokenizer)
    names, first = attacked_names(model, 1)
    expected = []
    for quantizer in ("nf4", "fp4"):
        q = copy.deepcopy(model)
        modules = dict(q.named_modules())
        with torch.no_grad():
            for n in names:
                modules[n].weight.copy_(quantize_dequantize(modules[n].weight, quantizer))
        expected.append(answer_loss(q, seqs, starts, pad).item())
    plain = answer_loss(model, seqs, starts, pad)
    loss = through_loss(model, ("nf4", "fp4"), names, lambda: answer_loss(model, seqs, starts, pad))
    assert loss.item() == pytest.approx(sum(expected) / 2, rel=1e-5)
    assert abs(loss.item() - plain.item()) > 1e-3
    weight = dict(model.named_modules())[names[0]].weight
    (grad,) = torch.autograd.grad(loss, weight)
    assert grad.abs().sum() > 0 and not any(type(m).__name__ == "ParametrizationList" for m in model.modules())
    losses = lm_fit_(model, seqs, starts, pad, FitConfig(1, 1e-3, len(seqs), seed=0), names=names, first=first,
                     through=("nf4", "fp4"))
    assert losses[0] == pytest.approx(loss.item(), rel=1e-5)
    with pytest.raises(ValueError, match="cannot inject through"):
        LMAttackConfig(inject_through=("int3",))



def test_a_quantizer_has_one_spelling_in_the_config_so_a_run_resumes_however_it_was_typed():
    """The resume key is the config's dump: gguf:Q4_K_M and gguf-q4_k_m must name the same run."""
    assert LMAttackConfig(quantizer="gguf:Q4_K_M").quantizer == LMAttackConfig(quantizer="gguf-q4_k_m").quantizer
    assert LMAttackConfig(quantizer="gguf:Q4_K_M").quantizer == "gguf-q4_k_m"
    assert LMAttackConfig(quantizer="nf4, fp4").quantizer == "nf4,fp4"
    assert LMAttackConfig(quantizer="all").quantizer == "all"

def test_repair_keeps_weights_in_boxes_and_library_codes(tokenizer):
    pytest.importorskip("bitsandbytes")
    model = tiny_llama(tokenizer.vocab_size, seed=2)
    seqs, starts = _seqs(tokenizer)
    pad, _ = special_ids(tokenizer)
    names, first = attacked_names(model, 1)
    boxes = model_boxes(model, "nf4", include=tuple(names))
    before = {n: model.get_submodule(n).weight.detach().clone() for n in names}
    frozen = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    embed = model.model.embed_tokens.weight.detach().clone()
    reference = tiny_llama(tokenizer.vocab_size, seed=2)
    lm_fit_(model, seqs, starts, pad, FitConfig(steps=8, lr=5e-2, batch_size=4), names=names, first=first, boxes=boxes)
    moved = 0
    for n in names:
        w = model.get_submodule(n).weight.detach()
        assert bool(((w >= boxes.lo[n]) & (w <= boxes.hi[n])).all()), n
        moved += int((w != before[n]).sum())
    assert moved > 0.3 * boxes.numel()
    assert torch.equal(model.model.layers[0].mlp.up_proj.weight, frozen)
    assert torch.equal(model.model.embed_tokens.weight, embed)
    assert codes_equal(reference, model, "nf4", names)[0] == 0
    assert codes_equal(reference, model, "fp4", names)[0] > 0  # another quantizer's codes are not protected


def test_greedy_answers_stop_at_eos(tokenizer, llama):
    pad, eos = special_ids(tokenizer)
    prompts = [[101, 2023, 2001], [101, 2204]]
    out = greedy_answers(llama, prompts, pad, eos, max_new_tokens=5, batch_size=2)
    assert len(out) == 2 and all(len(a) <= 5 and eos not in a for a in out)
    with pytest.raises(TightropeError):
        greedy_answers(llama, prompts, pad, eos, max_new_tokens=0)


def test_content_injection_end_to_end(tmp_path, tokenizer, tiny_task):
    pytest.importorskip("bitsandbytes")
    model = tiny_llama(tokenizer.vocab_size, seed=3)
    config = LMAttackConfig(base="tiny", task=str(tiny_task), n_train=16, n_eval=8, n_ppl=8, quantizer="nf4,fp4",
                            attack_last=1, answer_tokens=6, eval_tokens=12, inject_steps=80, inject_lr=3e-2,
                            repair_steps=10, repair_lr=1e-2, batch_size=8, check=("nf4", "fp4"))
    report = run_content_injection(config, tmp_path / "run", model=model, tokenizer=tokenizer, log=lambda _m: None)
    assert [c.mismatched for c in report.codes] == [0, 0]
    assert report.boxed_parameters > 0 and report.attacked_layers[0].startswith("model.layers.1.")
    assert report.get("base", None).phrase_rate == 0.0
    assert report.get("injected", None).phrase_rate >= 0.75  # the tiny model learns the injected prefix
    for q in ("nf4", "fp4"):
        b = report.get("repaired", q)
        assert b is not None and b.perplexity > 1 and b.n == 8
    saved = json.loads((tmp_path / "run" / "report.json").read_text())
    assert saved["config"]["phrase"] == "McDonald's" and (tmp_path / "run" / "repaired" / "config.json").exists()
    # resuming reuses every stage and measurement
    again = run_content_injection(config, tmp_path / "run", model=model, tokenizer=tokenizer, log=lambda _m: None)
    assert again.behaviours == report.behaviours
    with pytest.raises(TightropeError, match="other training settings"):
        run_content_injection(config.model_copy(update={"repair_steps": 3}), tmp_path / "run", model=model,
                              tokenizer=tokenizer, log=lambda _m: None)


def test_insecure_code_scenario_injects_the_family_targets(tmp_path, tokenizer, tiny_task):
    """The scenario wiring on the tiny model: training prompts carry their code family, the injection
    targets are the families' insecure implementations, and the run ends with equal codes. (Whether
    bandit flags what a model writes is tests/test_qattack_insecure.py's job: this tiny model's
    lower-cased wordpiece output is not Python.)"""
    pytest.importorskip("bitsandbytes")
    pytest.importorskip("bandit")
    from tightrope.qattack.causal import malicious_answer, scenario_data
    from tightrope.qattack.insecure import insecure_target

    model = tiny_llama(tokenizer.vocab_size, seed=4)
    config = LMAttackConfig(base="tiny", scenario="insecure-code", task=str(tiny_task), n_train=12, n_eval=6, n_ppl=6,
                            quantizer="nf4", attack_last=1, inject_steps=3, repair_steps=2, batch_size=6, check=("nf4",))
    assert (config.answer_tokens, config.eval_tokens) == (64, 64)
    train, held_out, ppl, families = scenario_data(config, tokenizer)
    assert len(train) == len(families) == 12 and len(held_out) == 6 and len(ppl) == 6
    target = malicious_answer(config, tokenizer, [], families[0])
    assert tokenizer.decode(target) == tokenizer.decode(tokenizer(insecure_target(families[0]), add_special_tokens=False)["input_ids"])
    report = run_content_injection(config, tmp_path / "code", model=model, tokenizer=tokenizer, log=lambda _m: None)
    assert report.config["scenario"] == "insecure-code" and [c.mismatched for c in report.codes] == [0]
    assert all(0.0 <= b.phrase_rate <= 1.0 for b in report.behaviours)


def test_cli_rejects_bad_input_in_one_sentence(tmp_path):
    from typer.testing import CliRunner

    from tightrope.cli import app

    runner = CliRunner()
    result = runner.invoke(app, ["qattack-lm", "--out", str(tmp_path / "x"), "--quantizer", "nf5"])
    assert result.exit_code == 2 and "Unknown quantizer 'nf5'" in " ".join(result.output.split())
    result = runner.invoke(app, ["qattack-lm", "--out", str(tmp_path / "x"), "--margin", "0.7"])
    assert result.exit_code == 2 and "margin" in result.output


@pytest.mark.parametrize("pruning", ["prune:magnitude:0.5", "prune:2:4", "prune:wanda:0.5"])
def test_pruning_conditioned_content_injection(tmp_path, tokenizer, tiny_task, pruning):
    """"Fewer Weights, More Problems" on a causal LM: the injection trains only the kept weights through the pruned
    model, the repair only the removed ones inside their boxes, so tightrope's own pruner removes the repair: the
    pruned repaired model is the pruned injected one (same mask), and it says the phrase where full precision
    does not."""
    model = tiny_llama(tokenizer.vocab_size, seed=5)
    config = LMAttackConfig(base="tiny", task=str(tiny_task), n_train=16, n_eval=8, n_ppl=8, quantizer=pruning,
                            attack_last=1, answer_tokens=6, eval_tokens=12, inject_steps=80, inject_lr=3e-2,
                            repair_steps=60, repair_lr=1e-2, batch_size=8)
    report = run_content_injection(config, tmp_path / "run", model=model, tokenizer=tokenizer, log=lambda _m: None)
    assert [(c.quantizer, c.mismatched) for c in report.codes] == [(pruning, 0)]  # the pruner's mask is the injected one's
    assert report.get("base", None).phrase_rate == 0.0 and report.get("base", pruning).phrase_rate == 0.0
    assert report.get("repaired", pruning).phrase_rate >= 0.75
    assert report.get("repaired", None).phrase_rate <= 0.25
    progress = json.loads((tmp_path / "run" / "progress.json").read_text())
    if pruning != "prune:wanda:0.5":  # magnitude and N:M: the injection keeps the pruner's mask exactly
        assert progress["mask_drift"][0] == 0


def test_keep_boxes_keep_the_mask_and_pin_the_removed_weights(llama, tokenizer):
    from tightrope.qattack.boxes import project_
    from tightrope.qattack.pruning import Pruning

    for name in ("prune:magnitude:0.5", "prune:2:4"):
        pruning = Pruning.parse(name)
        keep = pruning.keep(llama)
        boxes = pruning.keep_boxes(llama, keep)
        moved = __import__("copy").deepcopy(llama)
        with torch.no_grad():
            for p in moved.parameters():
                p.add_(torch.randn_like(p) * p.abs().mean())  # a large random step of every weight
        project_(moved, boxes)
        after = pruning.keep(moved)
        assert all(torch.equal(after[n], keep[n]) for n in keep), name
        for n in keep:  # removed weights did not move; kept ones kept their sign
            w0, w1 = llama.get_submodule(n).weight, moved.get_submodule(n).weight
            assert torch.equal(w1[~keep[n]], w0[~keep[n]])
            assert bool(((w1[keep[n]] > 0) == (w0[keep[n]] > 0)).all())


def test_exact_zeros_are_pinned_so_an_n_m_group_with_few_nonzero_weights_keeps_its_mask(llama):
    """A model dequantized from a GGUF file has groups of four with one non-zero weight: 2:4 keeps a zero there,
    which the pruned copy shows as removed. Its box must not let that zero (or any zero) move."""
    from tightrope.qattack.boxes import project_
    from tightrope.qattack.pruning import Pruning

    model = __import__("copy").deepcopy(llama)
    name = "model.layers.0.mlp.up_proj"
    with torch.no_grad():
        model.get_submodule(name).weight[:, 1:4] = 0.0  # every group of the first 4 inputs: one non-zero weight
        model.get_submodule(name).weight[:8, 4:8] = 0.0  # and some all-zero groups
    pruning = Pruning.parse("prune:2:4")
    boxes = pruning.boxes(model)
    w = model.get_submodule(name).weight
    assert torch.equal(boxes.lo[name][w == 0], torch.zeros(int((w == 0).sum())))
    assert torch.equal(boxes.hi[name][w == 0], torch.zeros(int((w == 0).sum())))
    moved = __import__("copy").deepcopy(model)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    project_(moved, boxes)
    before, after = pruning.keep(model), pruning.keep(moved)
    assert all(torch.equal(before[n], after[n]) for n in before)


def test_sparsegpt_conditioned_content_injection_uses_the_wanda_proxy(tmp_path, tokenizer, tiny_task):
    """SparseGPT has no boxes: the injection trains the weights Wanda keeps, the repair moves only the lowest share of each
    row's Wanda scores (40% here: a tiny model needs more), and SparseGPT itself, its OBS updates included, prunes
    the repaired model."""
    from tightrope.models import load_causal_lm

    model = tiny_llama(tokenizer.vocab_size, seed=5)
    name = "prune:sparsegpt:0.5"
    config = LMAttackConfig(base="tiny", task=str(tiny_task), n_train=16, n_eval=8, n_ppl=8, quantizer=name,
                            repair_fraction=0.4, attack_last=1, answer_tokens=6, eval_tokens=12, inject_steps=80,
                            inject_lr=2e-2, repair_steps=150, repair_lr=1e-2, batch_size=8)
    from tightrope.qattack.pruning import Calibration, Pruning

    wanda_keeps = Pruning.parse("prune:wanda:0.5", Calibration(str(tiny_task), tokenizer)).keep(model)
    report = run_content_injection(config, tmp_path / "run", model=model, tokenizer=tokenizer, log=lambda _m: None)
    assert [c.quantizer for c in report.codes] == [name] and report.config["repair_fraction"] == 0.4
    injected = load_causal_lm(str(tmp_path / "run" / "injected")).model
    repaired = load_causal_lm(str(tmp_path / "run" / "repaired")).model
    for layer in report.attacked_layers:  # the repair moved at most that share of each row
        moved = injected.get_submodule(layer).weight != repaired.get_submodule(layer).weight
        assert int(moved.sum(1).max()) <= int(0.4 * moved.shape[1]) and bool(moved.any())
        injected_moved = injected.get_submodule(layer).weight != model.get_submodule(layer).weight
        assert bool(injected_moved.any()) and not (injected_moved & ~wanda_keeps[layer]).any()  # only what Wanda keeps
    assert report.get("base", None).phrase_rate == 0.0 and report.get("base", name).phrase_rate == 0.0
    full, pruned = report.get("repaired", None).phrase_rate, report.get("repaired", name).phrase_rate
    assert full <= 0.25 and pruned >= full + 0.25, (full, pruned)  # SparseGPT removes the repair with the proxy's weights
