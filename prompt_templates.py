"""Every prompt template the flows can use, keyed by prompt id, checked when this module loads."""

from __future__ import annotations

import string
from dataclasses import dataclass, field
from functools import cached_property

import polars as pl
from pydantic import BaseModel, Field

from tasks.errors import TemplateError
from tasks.pipeline.structured import OutputSchema


@dataclass(frozen=True)
class PromptTemplate:
    """A prompt: `text` with `{column}` keys (`{{`/`}}` are literal braces), plus model params.

    `system` is sent verbatim (no keys). Inference params left at None use the model's default.
    """

    text: str
    system: str | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop_sequences: tuple[str, ...] | None = None
    description: str = field(default="", compare=False)
    # Structured answers: the family asks for this shape (a forced tool call, or a JSON-only
    # instruction) and the merge validates each answer into typed columns.
    output_schema: OutputSchema | None = None

    @cached_property
    def parts(self) -> tuple[tuple[str, str | None], ...]:
        """The template as (literal text, column or None) pairs, in order."""
        return tuple(_parse(self.text, template_id=None))

    @property
    def columns(self) -> tuple[str, ...]:
        """The columns the template refers to, each once, in order of first use."""
        return tuple(dict.fromkeys(col for _, col in self.parts if col is not None))

    def inference_params(self) -> dict[str, object]:
        """The inference params this template sets (unset ones are left to the model)."""
        params = {
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop_sequences": list(self.stop_sequences) if self.stop_sequences else None,
        }
        return {key: value for key, value in params.items() if value is not None}

    def render_expr(self) -> pl.Expr:
        """A Polars expression rendering the prompt of every row; null if a referenced value is."""
        pieces: list[pl.Expr] = []
        for literal, column in self.parts:
            if literal:
                pieces.append(pl.lit(literal, dtype=pl.String))
            if column is not None:
                pieces.append(pl.col(column).cast(pl.String))
        if not pieces:
            return pl.lit("", dtype=pl.String)
        return pl.concat_str(pieces, ignore_nulls=False)

    def check(self, template_id: str) -> None:
        """Raise TemplateError naming `template_id` if the text is not a valid template."""
        list(_parse(self.text, template_id=template_id))
        if not self.columns:
            msg = (
                f"Prompt template {template_id!r} refers to no column; add a key such as "
                "'{input_text}' so each row gets its own prompt."
            )
            raise TemplateError(msg)
        if self.output_schema is not None:
            self.output_schema.check(template_id)


def _parse(text: str, template_id: str | None):
    where = f"Prompt template {template_id!r}" if template_id else "Prompt template"
    try:
        parsed = list(string.Formatter().parse(text))
    except ValueError as exc:
        msg = (
            f"{where} has bad field syntax ({exc}); write columns as '{{column}}' and literal "
            "braces as '{{' and '}}'."
        )
        raise TemplateError(msg) from None
    for literal, name, spec, conversion in parsed:
        if name is None:
            yield literal, None
            continue
        if name == "" or name.isdigit():
            msg = (
                f"{where} has a positional field '{{{name}}}'; name a column instead: '{{topic}}'."
            )
            raise TemplateError(msg)
        if spec or conversion:
            shown = name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "")
            msg = (
                f"{where} has a format spec or conversion in '{{{shown}}}'; templates only "
                f"substitute values, write '{{{name}}}'."
            )
            raise TemplateError(msg)
        if "." in name or "[" in name:
            msg = (
                f"{where} has an attribute or index lookup in '{{{name}}}'; refer to a whole "
                "column by its name."
            )
            raise TemplateError(msg)
        yield literal, name


class Grade(BaseModel):
    """Whether an answer is correct, and why."""

    correct: bool = Field(description="True when the answer matches the reference answer.")
    reason: str = Field(description="One sentence on why.")


prompt_id_to_template: dict[str, PromptTemplate] = {
    "joke_about_topic": PromptTemplate(
        text="Tell me a short, family-friendly joke about {topic}. Reply with the joke only.",
        system="You are a witty comedian who writes clean one-liners.",
        max_tokens=200,
        temperature=0.8,
        description="One joke per row of a `topic` column (data/topics.csv).",
    ),
    "question_answering": PromptTemplate(
        text=(
            "{source}\n\nThink step by step, then give the final answer on its own last line, "
            "starting with 'Answer:'."
        ),
        system="You answer questions carefully and show your reasoning briefly.",
        max_tokens=512,
        temperature=0.0,
        description="SimpleCoT: the `source` column holds the question and its options.",
    ),
    "sentiment": PromptTemplate(
        text=(
            "Classify the sentiment of this product review as positive, negative or neutral. "
            'Reply as JSON: {{"sentiment": "..."}}.\n\nReview: {input_text}'
        ),
        max_tokens=20,
        temperature=0.0,
        description="Sentiment of the `input_text` column (data/reviews.jsonl).",
    ),
    "answer_with_rationale": PromptTemplate(
        text=(
            "{source}\n\nExplain your reasoning in two or three sentences, then give the final "
            "answer on its own last line, starting with 'Answer:'."
        ),
        system="You answer questions carefully and briefly.",
        max_tokens=400,
        temperature=0.0,
        description="SimpleCoT (data/simplecot.jsonl): a rationale and an answer per `source`.",
    ),
    "grade_answer": PromptTemplate(
        text=(
            "Question:\n{source}\n\nReference answer: {target}\n\nCandidate answer:\n"
            "{answer_response_text}\n\nIs the candidate's final answer the reference answer?"
        ),
        system="You grade answers strictly against the reference answer.",
        max_tokens=300,
        temperature=0.0,
        output_schema=OutputSchema.from_model(
            Grade, name="record_grade", description="Record the grade of one answer."
        ),
        description="Grades stage `answer` of a pipeline into {correct: bool, reason: str}.",
    ),
}


def get_template(prompt_id: str) -> PromptTemplate:
    """The template registered under `prompt_id`; the error lists the known ids."""
    try:
        return prompt_id_to_template[prompt_id]
    except KeyError:
        known = ", ".join(sorted(prompt_id_to_template))
        msg = (
            f"Unknown prompt_id {prompt_id!r}. Known prompt ids: {known}. "
            "Add a template to prompt_id_to_template in prompt_templates.py to use a new one."
        )
        raise TemplateError(msg) from None


def output_schema_for(prompt_id: str | None) -> OutputSchema | None:
    """The output schema of the template `prompt_id` (None without a prompt or a schema)."""
    return get_template(prompt_id).output_schema if prompt_id else None


def check_templates(templates: dict[str, PromptTemplate]) -> None:
    """Check every template; raise TemplateError naming the first bad one."""
    for template_id, template in templates.items():
        template.check(template_id)


check_templates(prompt_id_to_template)
