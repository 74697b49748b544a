"""Visualisation: concept browser, training curves, embedding map."""
