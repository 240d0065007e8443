"""Condensed sets: Distribution Matching / few-shot condensation and the .npz file."""
