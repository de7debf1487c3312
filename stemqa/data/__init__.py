"""Data: the one MCQ record, its loaders, the harness prompt, and preference pairs."""
