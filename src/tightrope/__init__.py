"""tightrope: compress language models and keep them robust against attacks."""

__version__ = "0.1.0"
