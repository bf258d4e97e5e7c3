"""User-facing errors of the evaluators (kept separate from genome_jax: evaluators never import JAX)."""


class UserError(Exception):
    """Bad input from the user (task file, adapter folder, endpoint). The message names the culprit."""


class EvaluatorCrashed(RuntimeError):
    """The evaluator process died or stopped answering; the message says how and what to do."""
