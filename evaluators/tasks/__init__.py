"""Evaluation tasks: registry, loading/validation, prompts, answer extraction, metrics. No JAX, no vLLM.

API (stable; backends and the run loop depend on it)
----------------------------------------------------
get_task(name_or_path, data_dir=None, *, formatter=None, mode=None, generation=None) -> Task
    name: one of list_tasks() (gsm8k, mmlu, hellaswag, truthfulqa, medmcqa, nlgraph, arc_c, drop, arc_e, piqa,
    openbookqa, boolq, commonsense_qa, winogrande, + registered);
    or a path to any task .json in the shared format (kind inferred: `choices` -> multiple choice, `answers` list ->
    free answer (DROP-like EM/F1), else exact match). data_dir: folder holding <name>.json (default: evaluators/data).
    formatter: PromptFormatter | model path str | callable str -> str (chat prompt for one user message).
    mode: "generate" | "choice_logprob" | "loglik" (multiple choice: per task, see docs/TASKS.md; others: generate).
    generation: GenerationConfig(max_tokens=None, temperature=0.0, seed=0) for generate mode.
list_tasks() -> list[str]
register_task(name) -> class decorator for a Task subclass

class Task:
    name: str; kind: "multiple_choice" | "exact_match" | "free_answer"; modes: tuple[str, ...]; mode: str
    load_data(split) -> list[dict]                          # implement (file tasks: validated items)
    build_requests(items, mode=None) -> list[Request]       # implement; protocol ChoiceRequest / GenerateRequest
    score(items, responses, mode=None) -> TaskResult        # implement; responses aligned with requests
    load(split, n=None) -> list[dict]                       # use this: load_data + first n + _split/_index tags
    format(user_message) -> str                             # chat prompt through the formatter
    make_result(items, *, mode, predictions, per_sample, references, ...) -> TaskResult   # helper for score()

TaskResult (frozen; to_json() / TaskResult.from_json(d) to cross a process boundary):
    task, split, mode, score (mean per_sample; fitness), metrics {name: float} (loglik: acc and acc_norm),
    predictions (canonical answers, "" = none extracted), per_sample (scores in [0,1]), references, ids,
    option_probs (choice_logprob / loglik: softmax over options per sample, else None), options (labels per sample,
    multiple choice), raw (generated texts, generate).
    Under loglik a task may build several requests per item (WinoGrande: one per option); score() takes the
    responses of build_requests in order.

PromptFormatter(model_path, system=None)(user_message) -> str   # transformers AutoTokenizer, local files only
weighted_fitness(task_results, weights=None) -> float           # weights validated + normalised
normalize_weights(weights, n_tasks, names=None) -> (weights, note | None)   # UserError on bad weights

Typical use by a backend:
    task = get_task("mmlu", formatter=model_path)
    items = task.load("dev", n=200)
    responses = [answer(r) for r in task.build_requests(items, task.mode)]
    result = task.score(items, responses, task.mode)
"""
from evaluators.tasks.base import (CHOICE_LOGPROB, EXACT_MATCH, FREE_ANSWER, GENERATE, KINDS, LOGLIK, MODES,
                                   MULTIPLE_CHOICE, GenerationConfig, Task, TaskResult)
from evaluators.tasks.builtin import (DROP, GSM8K, ExactMatchTask, FileTask, FreeAnswerTask, MultipleChoiceTask, NLGraph,
                                      get_task, task_from_file)
from evaluators.tasks.registry import list_tasks, register_task
from evaluators.tasks.loading import default_data_dir
from evaluators.tasks.metrics import normalize_weights, weighted_fitness
from evaluators.tasks.prompts import PromptFormatter, identity_formatter

__all__ = [
    "CHOICE_LOGPROB", "EXACT_MATCH", "FREE_ANSWER", "GENERATE", "KINDS", "LOGLIK", "MODES", "MULTIPLE_CHOICE", "DROP",
    "GSM8K",
    "ExactMatchTask", "FileTask", "FreeAnswerTask", "GenerationConfig", "MultipleChoiceTask", "NLGraph",
    "PromptFormatter", "Task", "TaskResult", "default_data_dir", "get_task", "identity_formatter", "list_tasks",
    "normalize_weights", "register_task", "task_from_file", "weighted_fitness",
]
