"""Backends that answer protocol requests for individuals: a managed local vLLM worker process (default), a pool of
them, Ray actors, and external OpenAI-compatible vLLM endpoints, behind the `Evaluator` facade of base.py; any other
`evaluators.protocol.ScoringBackend` (the JAX scorer) plugs into the same Evaluator. Never imports JAX."""
from evaluators.backends.base import Evaluator, IndividualResult, make_evaluator
from evaluators.backends.scratch import scratch_dir

__all__ = ["Evaluator", "IndividualResult", "make_evaluator", "scratch_dir"]
