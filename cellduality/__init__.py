"""CellDuality: language models that reason about single cells, aligned with label-free dual-task GRPO."""

__version__ = "0.1.0"
