"""The task registry: `@register_task("name")` classes, looked up by `tasks.builtin.get_task` (which also reads task
files by path). Imports only the Task interface, so task modules can register without a cycle."""
from __future__ import annotations

import os
from typing import Callable

from evaluators.tasks.base import Task

__all__ = ["list_tasks", "register_task", "registered"]

_REGISTRY: dict[str, type[Task]] = {}


def register_task(name: str) -> Callable[[type[Task]], type[Task]]:
    """Class decorator: `@register_task("mytask")` makes get_task("mytask") build that class (sets cls.name)."""
    if not name or os.sep in name or name.endswith(".json"):
        raise ValueError(f"invalid task name {name!r}")

    def deco(cls: type[Task]) -> type[Task]:
        if not (isinstance(cls, type) and issubclass(cls, Task)):
            raise TypeError(f"@register_task({name!r}) needs a subclass of evaluators.tasks.Task")
        prev = _REGISTRY.get(name)
        if prev is not None and (prev.__module__, prev.__qualname__) != (cls.__module__, cls.__qualname__):
            raise ValueError(f"task name {name!r} is already registered by {prev.__module__}.{prev.__qualname__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def list_tasks() -> list[str]:
    """Registered task names, sorted."""
    return sorted(_REGISTRY)


def registered(name: str) -> type[Task] | None:
    """The class registered as `name`, or None."""
    return _REGISTRY.get(name)
