"""Frozen-feature evaluation protocols (docs/method.md, "Evaluation protocols"; docs/evaluation.md)."""
