"""Evaluation under the original's module name; the code lives in engine/evaluation.py."""
from engine.evaluation import evaluate, gather_scores, inference, itm_eval, validate  # noqa: F401
