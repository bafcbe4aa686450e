"""Evaluation: metrics, the classical baseline, the evaluate job and its report."""
