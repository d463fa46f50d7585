"""Finished studies behind docs/results/: their scripts (run as python -m research.NAME) and results/."""
