"""Prompt text: the chat-template formatter and the per-format prompt bodies.

Requests carry the final prompt text, so backends never template. A formatter turns one user message into the
model's chat prompt, ending where the assistant's reply starts. It is a `PromptFormatter` (the model's own chat
template through transformers' AutoTokenizer, local files only, no JAX) or any plain function str -> str.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, Mapping, Union

from evaluators.errors import UserError

Formatter = Callable[[str], str]


class PromptFormatter:
    """formatter(user_message) -> chat prompt text with the generation prompt appended.

    model_path: a local HF model folder with tokenizer files and a chat template (e.g. the converted SmolLM2).
    system: an optional system message (None keeps the template's default behaviour).
    """

    def __init__(self, model_path: str | os.PathLike, system: str | None = None):
        from transformers import AutoTokenizer  # lazy: keeps `import evaluators.tasks` light

        self.model_path = os.path.expanduser(str(model_path))
        self.system = system
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(self.model_path, local_files_only=True)
        except (OSError, ValueError) as e:
            raise UserError(f"cannot load a tokenizer from {self.model_path}: {e}") from None
        if not getattr(self.tokenizer, "chat_template", None):
            raise UserError(f"the tokenizer in {self.model_path} has no chat template; pass a plain function as formatter")

    def __call__(self, user_message: str) -> str:
        messages = [{"role": "user", "content": user_message}]
        if self.system is not None:
            messages.insert(0, {"role": "system", "content": self.system})
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def __repr__(self) -> str:
        return f"PromptFormatter({self.model_path!r})"


def identity_formatter(user_message: str) -> str:
    """No chat template: the message is the prompt (base models, or tests without a tokenizer)."""
    return user_message


@functools.lru_cache(maxsize=8)
def _formatter_for(model_path: str) -> "PromptFormatter":
    return PromptFormatter(model_path)  # one tokenizer load per model, shared by all tasks


def as_formatter(formatter: Union[Formatter, str, os.PathLike, None]) -> Formatter | None:
    """None -> None; a str/PathLike model path -> PromptFormatter(path) (cached per path); a callable -> itself."""
    if formatter is None or callable(formatter):
        return formatter
    if isinstance(formatter, (str, os.PathLike)):
        return _formatter_for(os.path.abspath(os.path.expanduser(os.fspath(formatter))))
    raise UserError(f"formatter must be a model path or a function str -> str, got {type(formatter).__name__}")


# ----------------------------------------------------------------------------------------------- prompt bodies
def choices_block(choices: Mapping[str, str]) -> str:
    """'A. first\\nB. second ...' in the item's label order."""
    return "\n".join(f"{label}. {text}" for label, text in choices.items())


def multiple_choice_body(question: str, choices: Mapping[str, str], instruction: str = "") -> str:
    """The shared body of multiple-choice prompts: optional instruction line, question, labelled options."""
    head = f"{instruction}\n\n" if instruction else ""
    return f"{head}Question: {question.strip()}\n{choices_block(choices)}"


MC_REPLY_INSTRUCTION = "Answer with the letter of the correct option."
