"""Frozen-feature evaluation protocols (SOVE_SPEC §7)."""
