"""Any text model through the Converse request shape (modelInvocationType=Converse)."""

from __future__ import annotations

import polars as pl

from tasks.bedrock.families.base import ModelFamily, _field, _one, _struct, _texts_joined
from tasks.pipeline.columns import INPUT_TOKENS, OUTPUT_TOKENS, RESPONSE_TEXT, STOP_REASON

# Converse and Nova's messages-v1 answer alike: output.message.content[] blocks, where text
# blocks carry `text` and reasoning blocks (`reasoningContent`) do not, plus camelCase usage.
MESSAGES_OUTPUT = pl.Struct(
    {
        "output": pl.Struct(
            {"message": pl.Struct({"content": pl.List(pl.Struct({"text": pl.String}))})}
        ),
        "stopReason": pl.String,
        "usage": pl.Struct({"inputTokens": pl.Int64, "outputTokens": pl.Int64}),
    }
)
MESSAGES_SHAPE = "output.message.content[].text, usage.inputTokens, usage.outputTokens"
# Converse's StopReason enum (botocore 1.44.18, data/bedrock-runtime/2023-09-30/service-2.json:
# end_turn, tool_use, max_tokens, stop_sequence, guardrail_intervened, content_filtered, ...);
# Nova's invoke schema answers with the same values and puts a notice ("The generated text has
# been blocked by our content filters.") where the answer was (docs.aws.amazon.com/nova/latest/
# userguide/complete-request-schema-response.html and text-error-handing.html).
MESSAGES_FILTERED = ("content_filtered", "guardrail_intervened")


def parse_messages_output(output: pl.Expr) -> list[pl.Expr]:
    """Text, stop reason and token counts of a Converse-shaped output."""
    return [
        _texts_joined(_field(output, "output", "message", "content")).alias(RESPONSE_TEXT),
        _field(output, "stopReason").alias(STOP_REASON),
        _field(output, "usage", "inputTokens").alias(INPUT_TOKENS),
        _field(output, "usage", "outputTokens").alias(OUTPUT_TOKENS),
    ]


class Converse(ModelFamily):
    """Any text model in the catalog through Converse: one request shape for all of them."""

    name = "converse"
    prefixes = ()
    invocation_type = "Converse"
    output_dtype = MESSAGES_OUTPUT
    expected_shape = MESSAGES_SHAPE
    filtered_stop_reasons = MESSAGES_FILTERED

    def body_expr(self, prompt, system, options):
        return _struct(
            messages=_one(_struct(role="user", content=_one(_struct(text=prompt)))),
            system=_one(_struct(text=system)) if system is not None else None,
            inferenceConfig=_struct(
                maxTokens=options.max_tokens,
                temperature=options.temperature,
                topP=options.top_p,
                stopSequences=options.stop_sequences,
            ),
        )

    def structured_fields(self, schema):
        """Bedrock structured outputs (`outputConfig.textFormat`), for models that support it.

        Batch refuses `toolConfig` with the Converse invocation type, so no forced tool here.
        """
        if not schema.converse_output_config:
            return {}
        definition = {"schema": schema.schema_json(), "name": schema.name}
        if schema.description:
            definition["description"] = schema.description
        structure = {"jsonSchema": definition}
        return {"outputConfig": {"textFormat": {"type": "json_schema", "structure": structure}}}

    def parse_exprs(self, output):
        return parse_messages_output(output)
