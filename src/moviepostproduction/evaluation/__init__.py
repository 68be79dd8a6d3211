"""Evaluation metrics (DESIGN 8): bbox alignment, identity, leakage, seam ratio; see metrics.py."""
