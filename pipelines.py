"""Named pipelines: lists of stages (template + model, optional filter and carried columns)."""

from __future__ import annotations

import re
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from tasks.errors import TemplateError
from tasks.run.params import InferenceOverrides

CLAUDE_HAIKU = "anthropic.claude-3-haiku-20240307-v1:0"
NOVA_LITE = "amazon.nova-lite-v1:0"


class Stage(BaseModel):
    """One stage: a normal batch run over the previous stage's (filtered) output."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., description="Stage name: prefixes its output columns (a-z, 0-9, _).")
    prompt_id: str = Field(..., description="A key of prompt_templates.prompt_id_to_template.")
    model_id: str = Field(..., description="Bedrock model id of this stage.")
    invocation_type: Literal["InvokeModel", "Converse"] = "InvokeModel"
    filter: str | None = Field(
        None,
        description=(
            "SQL condition on the previous stage's output columns (e.g. 'error_code IS NULL'); "
            "rows it drops keep null columns for this stage."
        ),
    )
    carry: list[str] | None = Field(
        None,
        description=(
            "Previous stage's output columns passed on; its result columns arrive prefixed "
            "with its name (answer_response_text). Default: its inputs and response_text."
        ),
    )
    inference: InferenceOverrides = Field(default_factory=InferenceOverrides)
    max_records_per_job: int | None = Field(None, ge=1)

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not re.fullmatch(r"[a-z][a-z0-9_]{0,20}", value):
            msg = f"Stage name {value!r} must match [a-z][a-z0-9_]{{0,20}}: it prefixes columns."
            raise ValueError(msg)
        return value


pipeline_id_to_stages: dict[str, list[Stage]] = {
    # SimpleCoT rows answered with a rationale, then graded into {correct, reason}.
    "answer_and_grade": [
        Stage(name="answer", prompt_id="answer_with_rationale", model_id=NOVA_LITE),
        Stage(
            name="grade",
            prompt_id="grade_answer",
            model_id=CLAUDE_HAIKU,
            filter="error_code IS NULL",
            carry=["source", "target", "response_text"],
        ),
    ],
}


def get_pipeline(pipeline_id: str) -> list[Stage]:
    """The stages of the named pipeline; the error lists the known ids."""
    try:
        return pipeline_id_to_stages[pipeline_id]
    except KeyError:
        known = ", ".join(sorted(pipeline_id_to_stages))
        msg = (
            f"Unknown pipeline_id {pipeline_id!r}. Known pipelines: {known}. Add one to "
            "pipeline_id_to_stages in pipelines.py, or pass the stages as a parameter."
        )
        raise TemplateError(msg) from None
