"""The prompt an LLM teacher gets: our teacher system prompt, then the task's own user prompt.

Why not send the student's prompt as it is: the student's system prompt only states the format, while a
teacher writing SFT traces needs to be told what a good trace is (grounded in the genes of the prompt,
alternatives weighed, nothing outside the two tags). The user prompt is left untouched, so the
reasoning answers exactly the question the student will be trained on, and the SFT example pairs the
student's own prompt with the teacher's completion.

The wording lives in ``cellduality/teacher/templates/*.txt`` (package data, read with
``importlib.resources``) so it can be reviewed and edited as text: ``system.txt`` for every request,
plus one note per kind of question (``classification``, ``generation``, ``inpainting``,
``reconstruction``, and ``editing`` for the neighbourhood task, which has no dual).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from functools import cache
from importlib import resources
from typing import Any

from cellduality.tasks.dual import CLASSIFICATION_TASKS, GENERATION_TASKS

TEMPLATE_PACKAGE = "cellduality.teacher"
TEMPLATE_DIR = "templates"
TEMPLATES = ("system", "classification", "generation", "inpainting", "reconstruction", "editing")

FORWARD = "forward"
DUAL = "dual"
KINDS = (FORWARD, DUAL)


@cache
def load_template(name: str) -> str:
    """Text of ``templates/<name>.txt``, stripped; ``KeyError`` for a name that is not a template."""
    if name not in TEMPLATES:
        raise KeyError(f"no teacher template {name!r}; templates: {', '.join(TEMPLATES)}")
    path = resources.files(TEMPLATE_PACKAGE).joinpath(TEMPLATE_DIR, f"{name}.txt")
    return path.read_text(encoding="utf-8").strip()


def question_kind(task: str, kind: str) -> str:
    """Which guidance note fits a (task, forward|dual) pair.

    Forward classification and the generation duals both name a label; forward generation and the
    classification duals both write genes.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    if task in CLASSIFICATION_TASKS:
        return "classification" if kind == FORWARD else "inpainting"
    if task in GENERATION_TASKS:
        return "generation" if kind == FORWARD else "reconstruction"
    if task == "neighbourhood" and kind == FORWARD:
        return "editing"
    raise ValueError(f"no teacher question for task {task!r} ({kind})")


def teacher_system_prompt(task: str, kind: str) -> str:
    """Our system prompt for one kind of question: the general instructions, then the kind's note."""
    return f"{load_template('system')}\n\n{load_template(question_kind(task, kind))}"


def teacher_messages(prompt: Sequence[Mapping[str, Any]], task: str, kind: str) -> list[dict[str, str]]:
    """Chat messages for an LLM teacher: our system prompt replaces the task's, the rest is kept."""
    kept = [
        {"role": str(m.get("role", "user")), "content": str(m.get("content", ""))}
        for m in prompt
        if m.get("role") != "system"
    ]
    if not kept:
        raise ValueError("the task prompt has no user message")
    return [{"role": "system", "content": teacher_system_prompt(task, kind)}, *kept]


__all__ = [
    "DUAL",
    "FORWARD",
    "KINDS",
    "TEMPLATES",
    "load_template",
    "question_kind",
    "teacher_messages",
    "teacher_system_prompt",
]
