"""Defenses: adversarial training objectives, distillation, fake quantization, weight noise."""
