"""Prompts by task from a YAML file: `prompts: {task: {system: ..., user: ...}}` (system optional)."""

from __future__ import annotations

from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError

from ..params import ParamsError


class Prompt(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user: str
    system: str | None = None


class PromptsFile(BaseModel):
    model_config = ConfigDict(extra="forbid")
    prompts: dict[str, Prompt]


def load_prompts(path: str | Path) -> dict[str, Prompt]:
    path = Path(path)
    if not path.is_file():
        raise ParamsError(f"prompts file {path} not found (teacher.prompts_file)")
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
        return PromptsFile.model_validate(raw).prompts
    except yaml.YAMLError as e:
        raise ParamsError(f"{path} is not valid YAML: {e}") from None
    except ValidationError as e:
        problems = "; ".join(f"`{'.'.join(map(str, x['loc']))}`: {x['msg']}" for x in e.errors())
        raise ParamsError(f"{path}: {problems} (expected prompts: {{task: {{user, system}}}})") from None


def _prompts(path: str | Path, inline: dict | None) -> dict[str, Prompt]:
    if inline is None:
        return load_prompts(path)
    try:
        return PromptsFile.model_validate({"prompts": inline}).prompts
    except ValidationError as e:
        problems = "; ".join(f"`prompts.{'.'.join(map(str, x['loc'][1:]))}`: {x['msg']}" for x in e.errors())
        raise ParamsError(f"{problems} (expected prompts: {{task: {{user, system}}}})") from None


def teacher_prompts(teacher) -> dict[str, Prompt]:
    """The prompts of `params.teacher`: inline (`teacher.prompts`) or from `teacher.prompts_file`."""
    return _prompts(teacher.prompts_file, teacher.prompts)


def get_prompt(path: str | Path, task: str, inline: dict | None = None) -> Prompt:
    prompts = _prompts(path, inline)
    if task not in prompts:
        where = str(path) if inline is None else "the inline prompts"
        raise ParamsError(f"task {task!r} is not in {where} (allowed values: {', '.join(prompts)})")
    return prompts[task]
