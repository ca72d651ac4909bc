"""Evaluation: task metrics, speed and memory, and the frozen result records they fill."""
