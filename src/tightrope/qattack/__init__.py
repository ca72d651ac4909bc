"""Quantization- and pruning-conditioned attacks (Egashira et al. 2024, arXiv 2405.18137; "Fewer Weights, More
Problems", ICLR 2026) and their audit.

boxes.py   per-weight preimage intervals of LLM.int8 / NF4 / FP4 / torch dynamic int8
quantize.py quantize a copy of a model with the real libraries; read back the codes
pruning.py the masks tightrope's own pruners apply, and the boxes that keep a mask (magnitude, Wanda, N:M)
transform.py quantizers and prunings behind one interface and one name each (what --transform takes)
inject.py  fine-tune the malicious behaviour (step 1)
repair.py  projected gradient descent inside the boxes (step 3)
scenario.py the classifier scenario (a trigger word that only the quantized model obeys)
causal.py  the causal-LM scenario: content injection on SmolLM2 (a phrase only quantized answers say)
audit.py   does a checkpoint hide behaviour that only its quantized or pruned version shows?
audit_cache.py each transform's audit measurements on disk, keyed by the weights' fingerprint and the settings
calibration.py p-values against a null of clean models and their combination (the audit's verdict)
search.py  gradient-guided search for inputs on which full precision and the quantized model disagree
null/      the calibrated null the audit ships (benchmarks/audit_null.py)
"""
