"""Backends that answer protocol requests for individuals: a managed local vLLM worker process (default) and external
OpenAI-compatible vLLM endpoints, behind the `Evaluator` facade of base.py. Never imports JAX."""
from evaluators.backends.base import Evaluator, IndividualResult, make_evaluator, scratch_dir

__all__ = ["Evaluator", "IndividualResult", "make_evaluator", "scratch_dir"]
