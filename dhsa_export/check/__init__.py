"""Accuracy checks: reference implementations by op name, comparisons, reports."""
