"""The defense of Egashira et al. 2024 (arXiv 2405.18137, Sec. 5): Gaussian noise on the weights
before quantization, swept over sigma.

Noise of a few box widths moves most weights out of the boxes the repair exploited, so the codes
the user's quantizer produces are no longer the injected ones: the quantized behaviour returns to
the full-precision one, while sigma small against the weights keeps utility (the paper: sigma
about 1e-3 on Phi-2). The noise itself is :func:`tightrope.defenses.noise.add_weight_noise_`,
applied to exactly the layers a quantizer replaces.
"""

from __future__ import annotations

import copy
from dataclasses import asdict, dataclass

from tightrope.defenses.noise import add_weight_noise_
from tightrope.qattack.boxes import quantized_linears
from tightrope.qattack.inject import TriggerBehaviour, triggered
from tightrope.qattack.quantize import missing_library, quantized_copy
from tightrope.qattack.scenario import measure


@dataclass(frozen=True)
class NoisePoint:
    sigma: float  # absolute standard deviation added to every quantized weight
    quantizer: str | None  # None = full precision after noise
    clean_accuracy: float
    trigger_success: float

    def to_dict(self) -> dict:
        return asdict(self)


def noise_sweep(classifier, texts: list[str], labels: list[int], behaviour: TriggerBehaviour, sigmas: list[float],
                quantizers: tuple[str, ...] = ("llm-int8", "nf4", "fp4"), seed: int = 0) -> list[NoisePoint]:
    """Clean accuracy and trigger success of the noised model, full precision and quantized, per sigma."""

    clean_ids = classifier.encode(texts)
    trig_ids = classifier.encode(triggered(texts, behaviour, seed=seed + 17))
    names = tuple(quantized_linears(classifier.model))
    points = []
    for sigma in sigmas:
        model = copy.deepcopy(classifier.model).float().eval()
        if sigma > 0:
            add_weight_noise_(model, sigma, relative=False, seed=seed, include=names)
        variants = [(None, model)] + [(q, quantized_copy(model, q)) for q in quantizers if missing_library(q) is None]
        for q, m in variants:
            b = measure(m, classifier.pad_id, clean_ids, trig_ids, labels, behaviour, "noised", q)
            points.append(NoisePoint(sigma, q, b.clean_accuracy, b.trigger_success))
    return points
