"""Weakness analysis: per-class vulnerability, exploited words and positions, per-layer sensitivity."""

from __future__ import annotations

import torch
from torch import nn

from tightrope.study.weakness import (
    analyze_attack,
    changed_words,
    class_vulnerability,
    encoder_blocks,
    exploited_positions,
    exploited_words,
    layer_sensitivity,
)

EXAMPLES = [
    {"label": 0, "status": "succeeded", "original_text": "a dull , boring film", "perturbed_text": "a dul , boring film"},
    {"label": 0, "status": "failed", "original_text": "bad", "perturbed_text": "bad"},
    {"label": 1, "status": "succeeded", "original_text": "Dull? no , great fun", "perturbed_text": "Dul? no , graet fun"},
    {"label": 1, "status": "skipped", "original_text": "fine", "perturbed_text": "fine"},
]


def test_class_vulnerability_counts_like_textattack():
    per = class_vulnerability(EXAMPLES, ["neg", "pos"])
    assert per["neg"] == {"examples": 2, "succeeded": 1, "failed": 1, "skipped": 0, "asr": 0.5}
    assert per["pos"]["asr"] == 1.0 and per["pos"]["skipped"] == 1


def test_exploited_words_and_positions():
    assert changed_words("a dull , boring film", "a dul , boring film") == [(1, "dull", 5)]
    assert exploited_words(EXAMPLES)[0] == ("dull", 2)  # case and punctuation folded
    hist = exploited_positions(EXAMPLES)
    assert sum(hist) == 3 and hist[0] == 1 and hist[2] == 1 and hist[6] == 1


def test_analyze_attack_reads_a_stored_attack_result():
    out = analyze_attack({"attack_success_rate": 2 / 3, "label_names": ["neg", "pos"], "examples_detail": EXAMPLES})
    assert out["per_class"]["pos"]["succeeded"] == 1 and out["words"][0][0] == "dull"


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = nn.ModuleList([nn.Sequential(nn.Linear(4, 4)) for _ in range(3)])
        for i, block in enumerate(self.layer):
            with torch.no_grad():
                block[0].weight.copy_(torch.eye(4) * (i + 1))
                block[0].bias.zero_()

    def forward(self, x):
        for block in self.layer:
            x = block(x)
        return x


def test_layer_sensitivity_compresses_one_group_at_a_time():
    model = Tiny()
    groups = encoder_blocks(model)
    assert groups == {"block 0": ("layer.0.*",), "block 1": ("layer.1.*",), "block 2": ("layer.2.*",)}
    x = torch.ones(1, 4)

    def compress(m, patterns):  # "compression" that halves the weights of the chosen block
        import fnmatch

        for name, mod in m.named_modules():
            if isinstance(mod, nn.Linear) and any(fnmatch.fnmatch(name, p) for p in patterns):
                with torch.no_grad():
                    mod.weight.mul_(0.5 if name.startswith("layer.1") else 0.9)

    with torch.no_grad():
        out = layer_sensitivity(model, groups, compress, lambda m: {"score": float(m(x).sum())})
    assert out["reference"]["score"] == 24.0
    assert list(out["groups"])[0] == "block 1"  # the most harmful group comes first
    assert out["groups"]["block 1"]["delta_score"] == -12.0
    assert float(model(x).detach().sum()) == 24.0  # the original model is untouched
