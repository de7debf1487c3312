"""stemqa: adapt a small base LLM into a STEM multiple-choice study assistant, on Ray."""
__version__ = "0.1.0"
