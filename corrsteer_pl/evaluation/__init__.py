"""Evaluation: answer conditions over a split, score them, controls, validation passes, comparison, report."""
