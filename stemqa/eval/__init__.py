"""Evaluation: lm-eval compatible MCQ scoring (`scorer`) and evaluation runs writing metrics (`run`)."""
from stemqa.eval.run import evaluate, evaluate_remote, evaluate_sets, evaluate_sets_remote, load_scorer
from stemqa.eval.scorer import MCQScorer, Prediction, accuracy, cloze_prompt

__all__ = ["MCQScorer", "Prediction", "accuracy", "cloze_prompt", "evaluate", "evaluate_sets", "evaluate_remote",
           "evaluate_sets_remote", "load_scorer"]
