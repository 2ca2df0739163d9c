"""Scoring predictions: metrics, the evaluator (AP, operating point), the evaluate stage's outputs."""
