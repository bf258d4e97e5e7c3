"""The built-in tasks (multiple choice incl. WinoGrande, GSM8K, NLGraph, DROP), tasks built from a file path, and
`get_task` (by registered name or by path; importing this module registers the built-ins)."""
from __future__ import annotations

import os
from typing import Any, Sequence

from evaluators.errors import UserError
from evaluators.protocol import ChoiceRequest, ChoiceResponse, GenerateRequest, GenerateResponse, Request, Response
from evaluators.tasks import extraction as ex
from evaluators.tasks import metrics as M
from evaluators.tasks.base import (CHOICE_LOGPROB, EXACT_MATCH, FREE_ANSWER, GENERATE, LOGLIK, MULTIPLE_CHOICE, Item,
                                   Task, TaskResult)
from evaluators.tasks.loading import infer_kind, load_split, read_task_file, task_file
from evaluators.tasks.registry import list_tasks, register_task, registered
from evaluators.tasks.prompts import MC_REPLY_INSTRUCTION, multiple_choice_body


class FileTask(Task):
    """A task whose items come from a JSON file in the shared format (data_dir/<name>.json, or an explicit path)."""

    def __init__(self, *, path: str | os.PathLike | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        self.path = os.path.expanduser(os.fspath(path)) if path is not None else task_file(self.name, self.data_dir)
        if not os.path.isfile(self.path):  # fail at construction, before any scoring work starts
            where = f" (data_dir {self.data_dir})" if self.data_dir else ""
            raise UserError(f"task '{self.name}': file not found: {self.path}{where}")

    def load_data(self, split: str) -> list[Item]:
        return load_split(self.path, split, self.kind)

    def _generate_requests(self, items: Sequence[Item], user_messages: Sequence[str]) -> list[Request]:
        return [GenerateRequest(prompt=self.format(msg), **self.generation_kwargs(i))
                for i, msg in enumerate(user_messages)]

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r}, mode={self.mode!r}, path={self.path!r})"


# ------------------------------------------------------------------------------------------ multiple choice
ACC, ACC_NORM = "acc", "acc_norm"


class MultipleChoiceTask(FileTask):
    """Items {question, choices {label: text}, answer label}.

    choice_logprob: one ChoiceRequest per item; options are " A", " B", ... after a prompt that lists the choices
      and ends with "Answer:"; the prediction is the option with the highest log-probability (ties: first label).
      `logprob_chat` says whether that prompt goes through the chat template (user message = the question block +
      the reply instruction, then "Answer:" right after the assistant header) or is plain text.
    loglik: lm-eval style. Each option's TEXT is scored as a continuation of a task-specific context
      (`loglik_context`; default "Question: {question}\nAnswer:" + " {option}"). metrics: acc = argmax of the
      summed log-probs, acc_norm = argmax of log-prob / UTF-8 bytes of the continuation; the fitness score and the
      prediction follow `loglik_metric` (chosen per task on dev, docs/TASKS.md). `loglik_requests` may build
      several requests per item (WinoGrande: one per option); score() reads them back in the same order.
    generate: the chat prompt asks for the letter; extraction.extract_choice finds it in the reply.
    """

    kind = MULTIPLE_CHOICE
    modes = (CHOICE_LOGPROB, GENERATE, LOGLIK)
    default_mode = CHOICE_LOGPROB
    default_max_tokens = 32
    instruction = ""  # optional first line of the prompt
    # Decided by measurement (docs/TASKS.md, "Choice of prompt"): on SmolLM2-135M-Instruct, 50 dev items each,
    # plain text 0.36 / 0.16 (mmlu / arc_c) vs chat template 0.20 / 0.30: pooled 0.26 vs 0.25, so plain text
    # (also the harness convention and shorter). Per task: the `logprob_chat` argument or a subclass attribute.
    logprob_chat = False
    loglik_metric = ACC  # which of acc / acc_norm is the fitness under loglik (dev-measured, docs/TASKS.md)
    # Decided by measurement (docs/TASKS.md): plain text. Dev[:100] acc, plain vs chat: arc_e 0.58 vs 0.61, piqa
    # 0.74 vs 0.73 (pooled 0.66 vs 0.67, within noise); plain is the harness convention and 1.7x faster.
    loglik_chat = False

    def __init__(self, *, logprob_chat: bool | None = None, loglik_chat: bool | None = None, **kwargs: Any):
        super().__init__(**kwargs)
        if logprob_chat is not None:
            self.logprob_chat = bool(logprob_chat)
        if loglik_chat is not None:
            self.loglik_chat = bool(loglik_chat)

    def body(self, item: Item) -> str:
        return multiple_choice_body(item["question"], item["choices"], self.instruction)

    def choice_prompt(self, item: Item) -> str:
        if self.logprob_chat:
            return self.format(f"{self.body(item)}\n{MC_REPLY_INSTRUCTION}") + "Answer:"
        return f"{self.body(item)}\nAnswer:"

    # ---- loglik ----------------------------------------------------------------------------------------------
    def loglik_query(self, item: Item) -> str:
        """The context without its trailing answer cue (the user message when `loglik_chat`)."""
        return f"Question: {item['question'].strip()}"

    def loglik_context(self, item: Item) -> str:
        """The text every option continues: plain "<query>\nAnswer:", or the chat prompt of <query> + "Answer:"."""
        if self.loglik_chat:
            return self.format(self.loglik_query(item)) + "Answer:"
        return f"{self.loglik_query(item)}\nAnswer:"

    def loglik_requests(self, item: Item) -> list[ChoiceRequest]:
        """The item's requests; their options, concatenated, are the item's options in label order."""
        return [ChoiceRequest(prompt=self.loglik_context(item),
                              options=tuple(f" {text.strip()}" for text in item["choices"].values()))]

    def check_loglik_item(self, item: Item) -> None:
        """UserError naming the file and the item when it cannot be scored by log-likelihood."""
        choices = item.get("choices")
        if not isinstance(choices, dict) or not choices:
            raise UserError(f"{self.where(item)}: scoring mode 'loglik' needs 'choices' (option texts)")
        for label, text in choices.items():
            if not isinstance(text, str) or not text.strip():
                raise UserError(f"{self.where(item)}: choice {label!r} has no text to score under 'loglik'")

    def where(self, item: Item) -> str:
        ident = f" (id {item['id']!r})" if "id" in item else ""
        return f"{self.path}: {item.get('_split', '?')} item {item.get('_index', '?')}{ident}"

    def build_requests(self, items: Sequence[Item], mode: str | None = None) -> list[Request]:
        mode = self.check_mode(mode)
        if mode == LOGLIK:
            for it in items:  # every item is checked before any request exists
                self.check_loglik_item(it)
            return [r for it in items for r in self.loglik_requests(it)]
        if mode == CHOICE_LOGPROB:
            return [ChoiceRequest(prompt=self.choice_prompt(it), options=tuple(f" {lab}" for lab in it["choices"]))
                    for it in items]
        return self._generate_requests(items, [f"{self.body(it)}\n{MC_REPLY_INSTRUCTION}" for it in items])

    def _score_loglik(self, items: Sequence[Item], responses: Sequence[Response]) -> TaskResult:
        per_item = [self.loglik_requests(it) for it in items]
        self.check_responses([r for rs in per_item for r in rs], responses, ChoiceResponse)
        labels = [tuple(it["choices"]) for it in items]
        golds = [it["answer"] for it in items]
        acc, acc_norm, preds, probs = [], [], [], []
        pos = 0
        for it, reqs, labs, gold in zip(items, per_item, labels, golds):
            conts = [o for r in reqs for o in r.options]
            lps = [lp for r in responses[pos:pos + len(reqs)] for lp in r.logprobs]
            pos += len(reqs)
            if len(lps) != len(labs) or len(conts) != len(labs):
                raise ValueError(f"{self.name}: {len(lps)} option log-probs for {len(labs)} options")
            norm = M.per_byte(lps, conts)
            acc.append(float(labs[M.argmax(lps)] == gold))
            acc_norm.append(float(labs[M.argmax(norm)] == gold))
            chosen = lps if self.loglik_metric == ACC else norm
            preds.append(labs[M.argmax(chosen)])
            probs.append(M.softmax(chosen))
        n = len(items)
        metrics = {ACC: sum(acc) / n, ACC_NORM: sum(acc_norm) / n}
        return self.make_result(items, mode=LOGLIK, predictions=preds,
                                per_sample=acc if self.loglik_metric == ACC else acc_norm, references=golds,
                                metrics=metrics, option_probs=probs, options=labels)

    def score(self, items: Sequence[Item], responses: Sequence[Response], mode: str | None = None) -> TaskResult:
        mode = self.check_mode(mode)
        if mode == LOGLIK:
            return self._score_loglik(items, responses)
        labels = [tuple(it["choices"]) for it in items]
        golds = [it["answer"] for it in items]
        if mode == CHOICE_LOGPROB:
            self.check_responses(items, responses, ChoiceResponse)
            probs, preds = [], []
            for labs, r in zip(labels, responses):
                if len(r.logprobs) != len(labs):
                    raise ValueError(f"{self.name}: {len(r.logprobs)} option log-probs for {len(labs)} options")
                probs.append(M.softmax(r.logprobs))
                preds.append(labs[M.argmax(r.logprobs)])
            correct = [float(p == g) for p, g in zip(preds, golds)]
            return self.make_result(items, mode=mode, predictions=preds, per_sample=correct, references=golds,
                                    option_probs=probs, options=labels)
        self.check_responses(items, responses, GenerateResponse)
        texts = [r.text for r in responses]
        preds = [ex.extract_choice(t, labs, list(it["choices"].values())) for t, labs, it in zip(texts, labels, items)]
        correct = [float(p == g) for p, g in zip(preds, golds)]
        return self.make_result(items, mode=mode, predictions=preds, per_sample=correct, references=golds,
                                options=labels, raw=texts)


@register_task("mmlu")
class MMLU(MultipleChoiceTask):
    pass


@register_task("arc_c")
class ARCChallenge(MultipleChoiceTask):
    pass


@register_task("medmcqa")
class MedMCQA(MultipleChoiceTask):
    pass


@register_task("truthfulqa")
class TruthfulQA(MultipleChoiceTask):
    default_mode = LOGLIK  # dev-measured (docs/TASKS.md, "loglik: defaults")
    loglik_metric = ACC_NORM


@register_task("hellaswag")
class HellaSwag(MultipleChoiceTask):
    """loglik: the context itself, continued by " {ending}" (no "Question:"/"Answer:" framing)."""

    default_mode = LOGLIK  # dev-measured (docs/TASKS.md, "loglik: defaults")
    loglik_metric = ACC_NORM

    instruction = "Pick the most plausible continuation of the text."

    def loglik_query(self, item: Item) -> str:
        return item["question"].strip()

    def loglik_context(self, item: Item) -> str:
        return self.format(self.loglik_query(item)) if self.loglik_chat else self.loglik_query(item)


@register_task("arc_e")
class ARCEasy(MultipleChoiceTask):
    default_mode = LOGLIK  # dev-measured (docs/TASKS.md, "loglik: defaults")


@register_task("piqa")
class PIQA(MultipleChoiceTask):
    default_mode = LOGLIK  # dev-measured (docs/TASKS.md, "loglik: defaults")


@register_task("openbookqa")
class OpenBookQA(MultipleChoiceTask):
    default_mode = LOGLIK  # dev-measured (docs/TASKS.md, "loglik: defaults")
    loglik_metric = ACC_NORM


@register_task("commonsense_qa")
class CommonsenseQA(MultipleChoiceTask):
    default_mode = LOGLIK  # dev-measured (docs/TASKS.md, "loglik: defaults")


@register_task("boolq")
class BoolQ(MultipleChoiceTask):
    """loglik: "{passage}\nQuestion: {question}?\nAnswer:" + " yes" / " no". The file's `question` field already
    holds "{passage}\nQuestion: {question}?" (evaluators/data/README.md), so the context is that + "\nAnswer:"."""

    default_mode = LOGLIK  # dev-measured (docs/TASKS.md, "loglik: defaults")
    loglik_metric = ACC_NORM

    def loglik_query(self, item: Item) -> str:
        return item["question"].strip()


@register_task("winogrande")
class WinoGrande(MultipleChoiceTask):
    """Fill-in-the-blank (one `_` in the sentence), scored lm-eval's "partial" way: for each option, the prompt is
    the sentence up to the blank with the option filled in, and the scored continuation is the text after the
    blank, verbatim (so every option scores the same continuation and acc_norm == acc). One ChoiceRequest per
    option, with that one continuation. loglik only: a letter or a generated answer does not fit a cloze."""

    modes = (LOGLIK,)
    default_mode = LOGLIK

    def check_mode(self, mode: str | None) -> str:
        mode = mode or getattr(self, "mode", None) or self.default_mode
        if mode != LOGLIK:
            raise UserError(f"task '{self.name}' is a fill-in-the-blank task scored only with '{LOGLIK}' "
                            f"(partial scoring), not '{mode}'")
        return mode

    def check_loglik_item(self, item: Item) -> None:
        super().check_loglik_item(item)
        q = item["question"]
        if q.count("_") != 1:
            raise UserError(f"{self.where(item)}: a WinoGrande sentence needs exactly one '_' blank, "
                            f"found {q.count('_')}")
        if not q[q.index("_") + 1:].strip():
            raise UserError(f"{self.where(item)}: nothing follows the '_' blank, so there is no text to score")

    def loglik_requests(self, item: Item) -> list[ChoiceRequest]:
        q = item["question"]
        i = q.index("_")
        return [ChoiceRequest(prompt=q[:i] + text.strip(), options=(q[i + 1:].rstrip(),))
                for text in item["choices"].values()]


# --------------------------------------------------------------------------------------------- exact match
class ExactMatchTask(FileTask):
    """Items {question, answer}. generate only: the reply's answer (extraction.extract_free_answer) is compared
    with the gold answer after metrics.normalize_short (numbers by value, text case- and punctuation-insensitive)."""

    kind = EXACT_MATCH
    modes = (GENERATE,)
    default_mode = GENERATE
    default_max_tokens = 32
    reply_instruction = "Give only the final answer."

    def user_message(self, item: Item) -> str:
        return f"{item['question'].strip()}\n{self.reply_instruction}" if self.reply_instruction else item["question"]

    def extract(self, item: Item, text: str) -> str:
        """Canonical prediction from a reply."""
        return M.normalize_short(ex.extract_free_answer(text))

    def is_correct(self, item: Item, prediction: str) -> bool:
        return prediction != "" and prediction == M.normalize_short(item["answer"])

    def build_requests(self, items: Sequence[Item], mode: str | None = None) -> list[Request]:
        self.check_mode(mode)
        return self._generate_requests(items, [self.user_message(it) for it in items])

    def score(self, items: Sequence[Item], responses: Sequence[Response], mode: str | None = None) -> TaskResult:
        mode = self.check_mode(mode)
        self.check_responses(items, responses, GenerateResponse)
        texts = [r.text for r in responses]
        preds = [self.extract(it, t) for it, t in zip(items, texts)]
        correct = [float(self.is_correct(it, p)) for it, p in zip(items, preds)]
        return self.make_result(items, mode=mode, predictions=preds, per_sample=correct,
                                references=[it["answer"] for it in items], raw=texts)


@register_task("gsm8k")
class GSM8K(ExactMatchTask):
    """Grade-school math: the last stated number (extraction.extract_number) must equal the gold number."""

    default_max_tokens = 256
    reply_instruction = "Solve the problem step by step. End with a line of the form 'The answer is N'."

    def extract(self, item: Item, text: str) -> str:
        return ex.extract_number(text)

    def is_correct(self, item: Item, prediction: str) -> bool:
        return M.numeric_match(prediction, item["answer"])


@register_task("nlgraph")
class NLGraph(ExactMatchTask):
    """Graph reasoning. The question already ends with its answer instruction. connectivity items (gold Yes/No):
    extraction.extract_yes_no; shortest_path items (gold a number): extraction.extract_path_length."""

    default_max_tokens = 64
    reply_instruction = ""

    @staticmethod
    def domain(item: Item) -> str:
        d = item.get("domain")
        if d in ("connectivity", "shortest_path"):
            return d
        return "connectivity" if item["answer"].strip().lower() in ("yes", "no") else "shortest_path"

    def extract(self, item: Item, text: str) -> str:
        if self.domain(item) == "connectivity":
            return M.normalize_short(ex.extract_yes_no(text))
        return ex.extract_path_length(text)


# ------------------------------------------------------------------------------------ free answer (DROP)
class FreeAnswerTask(FileTask):
    """Items {question, answers [accepted strings], passage (optional)}. generate only; the reply's answer
    (extraction.extract_free_answer) is normalised (metrics.normalize_answer) and scored with exact match and token
    F1 against the best accepted answer. The fitness score is the mean F1 (EM is reported as a metric)."""

    kind = FREE_ANSWER
    modes = (GENERATE,)
    default_mode = GENERATE
    default_max_tokens = 32
    reply_instruction = "Answer with a short span from the passage or a number, nothing else."

    def user_message(self, item: Item) -> str:
        passage = f"Passage: {item['passage'].strip()}\n" if item.get("passage") else ""
        return f"{passage}Question: {item['question'].strip()}\n{self.reply_instruction}"

    def build_requests(self, items: Sequence[Item], mode: str | None = None) -> list[Request]:
        self.check_mode(mode)
        return self._generate_requests(items, [self.user_message(it) for it in items])

    def score(self, items: Sequence[Item], responses: Sequence[Response], mode: str | None = None) -> TaskResult:
        mode = self.check_mode(mode)
        self.check_responses(items, responses, GenerateResponse)
        texts = [r.text for r in responses]
        preds = [M.normalize_answer(ex.extract_free_answer(t)) for t in texts]
        em = [M.exact_match(p, it["answers"]) if p else 0.0 for p, it in zip(preds, items)]
        f1 = [M.max_f1(p, it["answers"]) if p else 0.0 for p, it in zip(preds, items)]
        n = len(items)
        metrics = {"f1": sum(f1) / n, "em": sum(em) / n}
        return self.make_result(items, mode=mode, predictions=preds, per_sample=f1, metrics=metrics,
                                references=[it["answers"][0] for it in items], raw=texts)


@register_task("drop")
class DROP(FreeAnswerTask):
    pass


# ----------------------------------------------------------------------------------------------- by path
_BY_KIND = {MULTIPLE_CHOICE: MultipleChoiceTask, EXACT_MATCH: ExactMatchTask, FREE_ANSWER: FreeAnswerTask}


def task_from_file(path: str, **kwargs: Any) -> Task:
    """A task for any file in the shared format; the kind is inferred from its items, the name is the file stem."""
    path = os.path.expanduser(path)
    if not os.path.isfile(path):
        raise UserError(f"task file not found: {path}")
    kwargs.pop("data_dir", None)  # an explicit path wins over data_dir
    data = read_task_file(path)
    kind = infer_kind(data, path)
    if kwargs.get("mode") == LOGLIK and kind != MULTIPLE_CHOICE:  # the first item decided the kind
        split, i, item = next((k, i, it) for k, v in data.items() if isinstance(v, list) for i, it in enumerate(v))
        ident = f" (id {item['id']!r})" if "id" in item else ""
        raise UserError(f"{path}: {split} item {i}{ident} has no 'choices'; scoring mode 'loglik' needs "
                        "multiple-choice items")
    name = os.path.splitext(os.path.basename(path))[0]
    cls = type(f"FileTask_{kind}", (_BY_KIND[kind],), {"name": name})
    return cls(path=path, **kwargs)


def _is_path(name: str) -> bool:
    return name.endswith(".json") or os.sep in name or (os.altsep is not None and os.altsep in name)


def get_task(name_or_path: str | os.PathLike, data_dir: str | os.PathLike | None = None, **kwargs: Any) -> Task:
    """A task by registered name, or a task file in the shared format by path (kind inferred from its items).

    data_dir: folder with <name>.json for file-backed named tasks (default: the copies in evaluators/data).
    kwargs: formatter=, mode=, generation= (see Task).
    """
    name = os.fspath(name_or_path)
    cls = registered(name)
    if cls is not None:
        return cls(data_dir=data_dir, **kwargs)
    if _is_path(name) or os.path.isfile(name):
        return task_from_file(name, **kwargs)
    raise UserError(f"unknown task '{name}' (known: {', '.join(list_tasks())}; or give a path to a task .json file)")
