"""User-facing errors of the JAX engine: the CLI prints them as one line and exits non-zero.

Library messages name parameters by their own names (`population_size`), never by a command-line flag: the CLI
knows how each parameter is spelled on its command line and renders a `ParamError` with that spelling.
"""
from __future__ import annotations

import string
from typing import Any, Callable


class UserError(Exception):
    """Bad input from the user (file, flag, config). The message names the culprit."""


class ParamError(UserError, ValueError):
    """A bad value (or combination) of named parameters.

    `template` names each parameter as a format field, the other fields are filled from `values`:

        ParamError("{population_size} must be at least 2, got {got}", got=1)

    str(e) spells parameters by their own names ("population_size must be at least 2, got 1");
    `e.render(spell)` by another spelling (the CLI passes name -> "--flag"). `e.params`: the parameters named, the
    culprit first.
    """

    def __init__(self, template: str, **values: Any):
        self.template = template
        self.values = values
        names = [field for _, field, _, _ in string.Formatter().parse(template) if field and field not in values]
        self.params: tuple[str, ...] = tuple(dict.fromkeys(names))
        super().__init__(self.render(str))

    def render(self, spell: Callable[[str], str]) -> str:
        """The message with each parameter spelled by `spell(name)` (values are inserted verbatim)."""
        return self.template.format(**{p: spell(p) for p in self.params}, **self.values)
