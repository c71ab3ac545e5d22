"""Vectorised model responders: one Polars pass turns a frame of modelInput JSON into outputs."""

from __future__ import annotations

import numpy as np
import polars as pl

from tasks.bedrock.catalog import TEMPERATURE_XOR_TOP_P

from .catalog import (
    ANTHROPIC,
    COHERE_EMBED,
    LLAMA,
    MISTRAL,
    MISTRAL_CHAT,
    NOVA,
    OPENAI_CHAT,
    OPENAI_GPT_OSS,
    TITAN_EMBED,
    ModelSpec,
)
from .structured import ANSWER, FAULT, QUOTE, TOOL_NAME, TRUNCATED, add_answers

# Columns of the frames the runner hands in and gets back.
RECORD_ID = "recordId"
MODEL_INPUT = "modelInput"
MODEL_OUTPUT = "modelOutput"
ERROR_CODE = "errorCode"
ERROR_MESSAGE = "errorMessage"
INPUT_TOKENS = "inputTokens"
OUTPUT_TOKENS = "outputTokens"
OUTPUT_COLUMNS = [
    RECORD_ID,
    MODEL_INPUT,
    MODEL_OUTPUT,
    ERROR_CODE,
    ERROR_MESSAGE,
    INPUT_TOKENS,
    OUTPUT_TOKENS,
]

INVOKE_MODEL = "InvokeModel"
CONVERSE = "Converse"

_HASH = "_hash"
_POOL = (
    "this is an emulated answer from the local bedrock batch emulator and not a real model "
    "output the words are drawn deterministically from the request so that the same input "
    "always gives the same reply which lets tests assert exact values while the token "
    "counts stay plausible for cost estimates and throughput metrics the emulator keeps "
    "shapes statuses quotas and output layout faithful to amazon bedrock batch inference "
    "so a pipeline can be dry run end to end before any money is spent on real jobs "
) * 4
# The user's turn of a chat body: its first text block (Anthropic, Nova, Converse) or its
# content string (OpenAI-style messages, whose system prompt is a turn of its own).
_USER_TURN = "$.messages[?(@.role == 'user')]"
# The user's turn inside a raw chat prompt: what comes before it and after it.
_PROMPT_TURNS = (
    ("user<|end_header_id|>\n\n", "<|eot_id|>"),  # Llama 3
    ("user<|header_end|>\n\n", "<|eot|>"),  # Llama 4
    ("[INST] ", " [/INST]"),  # Mistral: holds the system prompt too (it has no system role)
)
QUOTE_CHARS = 40
_TEXT_VALUE = r'"(?:text|content|system)"\s*:\s*"(?:[^"\\]|\\.)*"'
_SURROGATE_PAIR = r"\\u[dD][89abAB][0-9a-fA-F]{2}\\u[dD][c-fC-F][0-9a-fA-F]{2}"
_REASONING_ENABLED = r'"reasoningConfig"\s*:\s*\{[^}]*"enabled"'
# Nova's reasoningContent "contains the reasoning text, which will always be [REDACTED] in the
# response" (docs.aws.amazon.com/nova/latest/userguide/complete-request-schema-response.html,
# read 2026-12-08).
_NOVA_REASONING = '{"reasoningContent":{"reasoningText":{"text":"[REDACTED]"}}}'
_COHERE_INPUT_TYPES = ["search_document", "search_query", "classification", "clustering"]


def _path(expr: pl.Expr, path: str) -> pl.Expr:
    return expr.str.json_path_match(path)


def _malformed(detail: str) -> str:
    return f"Malformed input request: {detail}, please reformat your input and try again."


def _missing(key: str) -> str:
    return _malformed(f"#: required key [{key}] not found")


def _bad_value(key: str, value: pl.Expr, constraint: str) -> pl.Expr:
    """Message naming the key, the bad value and the constraint it breaks."""
    return pl.concat_str(
        pl.lit(f"Malformed input request: #/{key}: "),
        value,
        pl.lit(f" {constraint}, please reformat your input and try again."),
    )


def _checks(spec: ModelSpec, invocation_type: str) -> list[tuple[pl.Expr, str | pl.Expr]]:
    """(is_bad, message) pairs, first match wins; the message names the key and constraint."""
    # Reading the input refused lines whose modelInput is not a JSON object (runner).
    mi = pl.col(MODEL_INPUT)
    checks: list[tuple[pl.Expr, str | pl.Expr]] = []
    if invocation_type == CONVERSE:
        return [
            (~mi.str.contains('"messages"', literal=True), _missing("messages")),
            (
                _path(mi, "$.messages[0].role").is_null(),
                _malformed("#/messages: expected a non-empty array of {role, content}"),
            ),
            # A Converse message's content is a list of blocks (botocore bedrock-runtime
            # `Message.content`: ContentBlocks).
            (
                ~_path(mi, "$.messages[0].content").str.starts_with("["),
                _malformed("#/messages/0/content: expected type: JSONArray"),
            ),
            # "Records that include toolConfig fail with a 400 error" (user guide,
            # batch-inference.html, Converse invocation type); the message wording is ours.
            (
                _path(mi, "$.toolConfig").is_not_null(),
                _malformed("#: extraneous key [toolConfig] is not permitted"),
            ),
            *_limit_checks(spec, invocation_type),
        ]
    family = spec.family
    if family == ANTHROPIC:
        version = _path(mi, "$.anthropic_version")
        checks += [
            (version.is_null(), _missing("anthropic_version")),
            (
                version != "bedrock-2023-05-31",
                _bad_value(
                    "anthropic_version",
                    version,
                    "is not a valid enum value, expected bedrock-2023-05-31",
                ),
            ),
            (_path(mi, "$.max_tokens").is_null(), _missing("max_tokens")),
            (~mi.str.contains('"messages"', literal=True), _missing("messages")),
            (
                _path(mi, "$.messages[0].role").is_null(),
                _malformed("#/messages: expected a non-empty array of {role, content}"),
            ),
        ]
    elif family == NOVA:
        checks += [
            (~mi.str.contains('"messages"', literal=True), _missing("messages")),
            (
                _path(mi, "$.messages[0].content[0]").is_null(),
                _malformed("#/messages: expected a non-empty array of {role, content: [{text}]}"),
            ),
        ]
    elif family == TITAN_EMBED:
        dims = _path(mi, "$.dimensions")
        allowed = [str(d) for d in spec.dimensions]
        checks += [
            (_path(mi, "$.inputText").is_null(), _missing("inputText")),
            (
                dims.is_not_null() & ~dims.is_in(allowed),
                _bad_value(
                    "dimensions",
                    dims,
                    f"is not a valid enum value, expected one of {', '.join(allowed)}",
                ),
            ),
        ]
    elif family == COHERE_EMBED:
        input_type = _path(mi, "$.input_type")
        checks += [
            (_path(mi, "$.texts").is_null(), _missing("texts")),
            (
                ~_path(mi, "$.texts").str.starts_with("["),
                _malformed("#/texts: expected type: JSONArray"),
            ),
            (input_type.is_null(), _missing("input_type")),
            (
                ~input_type.is_in(_COHERE_INPUT_TYPES),
                _bad_value(
                    "input_type",
                    input_type,
                    f"is not a valid enum value, expected one of {', '.join(_COHERE_INPUT_TYPES)}",
                ),
            ),
        ]
    elif family in (LLAMA, MISTRAL):
        checks += [(_path(mi, "$.prompt").is_null(), _missing("prompt"))]
    elif family == MISTRAL_CHAT or family in OPENAI_CHAT:
        checks += [
            (~mi.str.contains('"messages"', literal=True), _missing("messages")),
            (
                _path(mi, "$.messages[0].role").is_null(),
                _malformed("#/messages: expected a non-empty array of {role, content}"),
            ),
        ]
    return [*checks, *_limit_checks(spec, invocation_type)]


def _error_message(spec: ModelSpec, invocation_type: str) -> pl.Expr:
    chain = None
    for bad, message in _checks(spec, invocation_type):
        value = pl.lit(message) if isinstance(message, str) else message
        bad = bad.fill_null(True)
        chain = pl.when(bad).then(value) if chain is None else chain.when(bad).then(value)
    return chain.otherwise(pl.lit(None, dtype=pl.Utf8))


def _content_chars(body: pl.Expr) -> pl.Expr:
    """Characters of the text a chat body carries: its text, content and system strings.

    Counted on the decoded strings (an escape such as \\n or \\u00e9 is one character), so the
    same request gives the same count however its JSON is spaced or escaped: a batch line
    written by Polars and a CountTokens call encoded by botocore agree. Keys, roles and
    inference parameters are not text the model reads, so they do not count.
    """
    values = body.str.extract_all(_TEXT_VALUE).list.eval(
        pl.element()
        .str.replace(r'^"[a-zA-Z]+"\s*:\s*"', "")
        .str.slice(0, pl.element().str.len_chars() - 1)  # the closing quote
    )
    decoded = (
        values.list.join("")
        .str.replace_all(_SURROGATE_PAIR, "x")
        .str.replace_all(r"\\u[0-9a-fA-F]{4}", "x")
        .str.replace_all(r"\\.", "x")
    )
    return decoded.str.len_chars()


def input_token_count(spec: ModelSpec, invocation_type: str) -> pl.Expr:
    """Input tokens of each modelInput, as jobs, InvokeModel and CountTokens all report them.

    Emulated tokenizer: one token per 4 characters of the text the model reads, plus 8 for the
    request's framing. Chat bodies count their text strings (`_content_chars`); prompt and
    embedding bodies count their prompt, inputText or texts value.
    """
    mi = pl.col(MODEL_INPUT)
    if invocation_type == CONVERSE or spec.family in (ANTHROPIC, NOVA, MISTRAL_CHAT, *OPENAI_CHAT):
        chars = _content_chars(mi)
    else:
        chars = _prompt_text(spec, invocation_type).fill_null("").str.len_chars()
    return (chars // 4 + 8).cast(pl.Int64)


def _prompt_text(spec: ModelSpec, invocation_type: str) -> pl.Expr:
    """The text of a prompt or embedding body that counts as its input."""
    if spec.family == TITAN_EMBED:
        return _path(pl.col(MODEL_INPUT), "$.inputText")
    if spec.family == COHERE_EMBED:
        return _path(pl.col(MODEL_INPUT), "$.texts")
    return _path(pl.col(MODEL_INPUT), "$.prompt")


def _user_text(spec: ModelSpec, invocation_type: str) -> pl.Expr:
    """The user's own prompt in a text body, without the system prompt or chat markup."""
    mi = pl.col(MODEL_INPUT)
    if invocation_type == CONVERSE or spec.family in (ANTHROPIC, NOVA, MISTRAL_CHAT, *OPENAI_CHAT):
        blocks = mi.str.json_path_match(_USER_TURN + ".content[0].text")
        return pl.coalesce(blocks, mi.str.json_path_match(_USER_TURN + ".content"))
    prompt = _prompt_text(spec, invocation_type)
    turns = [
        prompt.str.splitn(before, 2)
        .struct.field("field_1")
        .str.splitn(after, 2)
        .struct.field("field_0")
        for before, after in _PROMPT_TURNS
    ]
    return pl.coalesce(*turns, prompt)


def quote(text: pl.Expr) -> pl.Expr:
    """How a reply quotes its prompt: whole, or its first and last 40 characters.

    Both ends, so an answer names its own prompt whether a template puts the row's values
    first or last (tests check each answer against the prompt of its own row).
    """
    whole = text.fill_null("")
    ends = pl.concat_str(whole.str.head(QUOTE_CHARS), pl.lit(" ... "), whole.str.tail(QUOTE_CHARS))
    return pl.when(whole.str.len_chars() <= 2 * QUOTE_CHARS).then(whole).otherwise(ends)


def _max_tokens_path(spec: ModelSpec, invocation_type: str) -> str:
    """Where a text body asks for its most output tokens."""
    if invocation_type == CONVERSE or spec.family == NOVA:
        return "$.inferenceConfig.maxTokens"
    if spec.family == LLAMA:
        return "$.max_gen_len"
    if spec.family == OPENAI_GPT_OSS:
        return "$.max_completion_tokens"
    return "$.max_tokens"


def _asked_tokens(spec: ModelSpec, invocation_type: str) -> pl.Expr:
    path = _max_tokens_path(spec, invocation_type)
    return _path(pl.col(MODEL_INPUT), path).cast(pl.Int64, strict=False)


def _max_tokens(spec: ModelSpec, invocation_type: str) -> pl.Expr:
    limit = _asked_tokens(spec, invocation_type)
    return limit.fill_null(spec.max_output_tokens).clip(1, spec.max_output_tokens)


def _limit_checks(spec: ModelSpec, invocation_type: str) -> list[tuple[pl.Expr, str | pl.Expr]]:
    """The model's own limits, checked per record as Bedrock does (a 400 each)."""
    if spec.embedding:
        return []
    mi = pl.col(MODEL_INPUT)
    asked = _asked_tokens(spec, invocation_type)
    key = _max_tokens_path(spec, invocation_type).removeprefix("$.").replace(".", "/")
    # "is not greater or equal to" is the JSON-schema validator's wording Bedrock's other
    # "Malformed input request: #/..." messages come from.
    checks = [
        (
            asked.is_not_null() & (asked < 1),
            _bad_value(key, asked.cast(pl.String), "is not greater or equal to 1"),
        )
    ]
    if spec.output_limit is not None:
        # Bedrock's answer, quoted in langgenius/dify issue #10390 and vercel/ai issue #2772.
        limit = spec.output_limit
        checks.append(
            (
                asked.is_not_null() & (asked > limit),
                f"The maximum tokens you requested exceeds the model limit of {limit}. Try "
                f"again with a maximum tokens value that is lower than {limit}.",
            )
        )
    if TEMPERATURE_XOR_TOP_P in spec.rules:
        # "`temperature` and `top_p` cannot both be specified for this model. Please use only
        # one." (aws-samples/sample-connector-for-bedrock issue #87, Claude Sonnet 4.5).
        config = "$.inferenceConfig." if invocation_type == CONVERSE else "$."
        top_p = "topP" if invocation_type == CONVERSE else "top_p"
        checks.append(
            (
                _path(mi, config + "temperature").is_not_null()
                & _path(mi, config + top_p).is_not_null(),
                "`temperature` and `top_p` cannot both be specified for this model. Please use "
                "only one.",
            )
        )
    return checks


def _text_output(spec: ModelSpec, invocation_type: str) -> pl.Expr:
    """modelOutput JSON for a text model, shaped like the family's real response."""
    h = pl.col(_HASH)
    in_tok = pl.col(INPUT_TOKENS)
    wanted = (h % 48 + 12).cast(pl.Int64)
    limit = _max_tokens(spec, invocation_type)
    out_tok = pl.min_horizontal(wanted, limit)
    truncated = wanted > limit
    body_chars = (out_tok * 4).cast(pl.Int64)
    text = pl.concat_str(
        pl.lit(f"[emulated {spec.short_name}] Reply to: "),
        pl.col(QUOTE),
        pl.lit(" | "),
        pl.lit(_POOL).str.slice((h % 300).cast(pl.Int64), body_chars),
    )
    # A structured request (JSON-only instruction) is answered with JSON in its shape.
    answer = pl.col(ANSWER)
    text = pl.when(answer.is_not_null()).then(answer).otherwise(text)
    out_tok = pl.when(answer.is_not_null()).then(answer.str.len_chars() // 4 + 1).otherwise(out_tok)
    truncated = truncated | (answer.is_not_null() & (pl.col(FAULT) == TRUNCATED))
    message_id = pl.concat_str(pl.lit("msg_bdrk_"), (h % 10**15).cast(pl.Utf8).str.zfill(15))
    if invocation_type == CONVERSE or spec.family == NOVA:
        stop = pl.when(truncated).then(pl.lit("max_tokens")).otherwise(pl.lit("end_turn"))
        content = pl.concat_list(pl.struct(text=text))
        fields = {
            "output": pl.struct(message=pl.struct(role=pl.lit("assistant"), content=content)),
            "stopReason": stop,
            "usage": pl.struct(
                inputTokens=in_tok, outputTokens=out_tok, totalTokens=in_tok + out_tok
            ),
        }
        if invocation_type == CONVERSE:
            fields["metrics"] = pl.struct(latencyMs=(h % 900 + 100).cast(pl.Int64))
        encoded = pl.struct(**fields).struct.json_encode()
        if invocation_type == INVOKE_MODEL and "nova-2" in spec.model_id:
            # Nova 2 with reasoning enabled puts a reasoningContent block before the text.
            enabled = pl.col(MODEL_INPUT).str.contains(_REASONING_ENABLED)
            encoded = (
                pl.when(enabled)
                .then(
                    encoded.str.replace(
                        '"content":[', '"content":[' + _NOVA_REASONING + ",", literal=True
                    )
                )
                .otherwise(encoded)
            )
        return encoded, out_tok
    if spec.family == ANTHROPIC:
        stop = pl.when(truncated).then(pl.lit("max_tokens")).otherwise(pl.lit("end_turn"))
        out = pl.struct(
            id=message_id,
            type=pl.lit("message"),
            role=pl.lit("assistant"),
            model=pl.lit(spec.response_model_name),
            content=pl.concat_list(pl.struct(type=pl.lit("text"), text=text)),
            stop_reason=stop,
            stop_sequence=pl.lit(None, dtype=pl.Utf8),
            usage=pl.struct(input_tokens=in_tok, output_tokens=out_tok),
        )
        # A forced tool call answers with one tool_use block whose input is the object.
        tool = pl.concat_str(
            pl.lit('{"id":"'),
            message_id,
            pl.lit(f'","type":"message","role":"assistant","model":"{spec.response_model_name}",'),
            pl.lit('"content":[{"type":"tool_use","id":"toolu_bdrk_emulated","name":"'),
            pl.col(TOOL_NAME),
            pl.lit('","input":'),
            answer,
            pl.lit('}],"stop_reason":"tool_use","stop_sequence":null,"usage":{"input_tokens":'),
            in_tok.cast(pl.String),
            pl.lit(',"output_tokens":'),
            out_tok.cast(pl.String),
            pl.lit("}}"),
        )
        encoded = (
            pl.when(pl.col(TOOL_NAME).is_not_null()).then(tool).otherwise(out.struct.json_encode())
        )
        return encoded, out_tok
    stop = pl.when(truncated).then(pl.lit("length")).otherwise(pl.lit("stop"))
    if spec.family == MISTRAL_CHAT:
        out = pl.struct(
            choices=pl.concat_list(
                pl.struct(
                    index=pl.lit(0),
                    message=pl.struct(role=pl.lit("assistant"), content=text),
                    stop_reason=stop,
                )
            )
        )
        return out.struct.json_encode(), out_tok
    if spec.family in OPENAI_CHAT:
        content = (
            pl.concat_str(pl.lit("<reasoning>emulated reasoning</reasoning>"), text)
            if spec.family == OPENAI_GPT_OSS
            else text
        )
        out = pl.struct(
            id=pl.concat_str(pl.lit("chatcmpl-"), (h % 10**12).cast(pl.Utf8).str.zfill(12)),
            object=pl.lit("chat.completion"),
            created=pl.lit(1_767_225_600),
            model=pl.lit(spec.model_id),
            choices=pl.concat_list(
                pl.struct(
                    index=pl.lit(0),
                    message=pl.struct(role=pl.lit("assistant"), content=content),
                    finish_reason=stop,
                )
            ),
            usage=pl.struct(
                prompt_tokens=in_tok, completion_tokens=out_tok, total_tokens=in_tok + out_tok
            ),
        )
        return out.struct.json_encode(), out_tok
    if spec.family == LLAMA:
        out = pl.struct(
            generation=text,
            prompt_token_count=in_tok,
            generation_token_count=out_tok,
            stop_reason=stop,
        )
        return out.struct.json_encode(), out_tok
    out = pl.struct(outputs=pl.concat_list(pl.struct(text=text, stop_reason=stop)))
    return out.struct.json_encode(), out_tok


def _embed_matrix(hashes: np.ndarray, dims: int, normalize: np.ndarray) -> np.ndarray:
    """Deterministic pseudo-random vectors from input hashes; unit norm where asked."""
    seed = (hashes % np.uint64(1 << 20)).astype(np.float64) + 1.0
    j = np.arange(1, dims + 1, dtype=np.float64)
    vectors = np.sin(np.outer(seed, j) * 0.6180339887 + np.outer(seed * 1e-3, j * j) * 1e-2)
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    norms[norms == 0] = 1.0
    scale = np.where(normalize[:, None], 1.0 / norms, 0.05)
    return np.round(vectors * scale, 7).astype(np.float32)


def _quantized(matrix: np.ndarray, kind: str) -> np.ndarray:
    """One embedding type from float vectors: int8/uint8 scaled to their range; binary/ubinary
    the sign bits packed 8 to a byte (Cohere's), read as signed or unsigned bytes.

    Each vector on its own scale: a record's answer must not depend on its job-mates (a retry
    on demand gets the one its batch line would have had)."""
    if kind == "int8":
        scale = np.maximum(np.abs(matrix).max(axis=1, keepdims=True), 1e-9)
        return np.clip(np.round(matrix * 127 / scale), -128, 127).astype(np.int8)
    if kind == "uint8":
        return (_quantized(matrix, "int8").astype(np.int16) + 128).astype(np.uint8)
    packed = np.packbits(matrix > 0, axis=1)
    return packed.view(np.int8) if kind == "binary" else packed


def _asked_types(frame: pl.DataFrame, key: str) -> pl.Series:
    """Each request's embedding types (its `key` list), in the order asked; null: none."""
    return (
        frame.get_column(MODEL_INPUT)
        .str.json_decode(pl.Struct({key: pl.List(pl.Utf8)}))
        .struct.field(key)
    )


def _titan_outputs(ok: pl.DataFrame, spec: ModelSpec) -> pl.DataFrame:
    mi = pl.col(MODEL_INPUT)
    ok = ok.with_columns(_asked_types(ok, "embeddingTypes").alias("_types"))
    ok = ok.with_columns(
        _dims=_path(mi, "$.dimensions")
        .cast(pl.Int64, strict=False)
        .fill_null(spec.default_dimension),
        _norm=_path(mi, "$.normalize").fill_null("true") != "false",
        # Seeded by the decoded text, not the body's JSON: a record retried on demand
        # (botocore's spacing and escapes) gets the vector its batch line would have.
        _text_hash=_path(mi, "$.inputText").fill_null("").hash(seed=7),
    )
    parts = []
    for (dims, types), part in ok.group_by(
        "_dims", pl.col("_types").list.join(","), maintain_order=True
    ):
        matrix = _embed_matrix(
            part["_text_hash"].to_numpy(), int(dims), part["_norm"].to_numpy().astype(bool)
        )
        vectors = pl.Series(matrix).arr.to_list()
        # "embeddingsByType ... This field will always appear. Even if you don't specify
        # embeddingTypes in your input, there will still be "float"" (AWS user guide,
        # model-parameters-titan-embed-text.html, V2 Response, read 2026-12-08); with
        # embeddingTypes it lists the asked ones, "binary": [int,..] (here 0 or 1 a dimension).
        bits = pl.Series((matrix > 0).astype(np.uint8)).arr.to_list()
        by_type = {
            kind: vectors if kind == "float" else bits
            for kind in (types.split(",") if types else ["float"])
        }
        parts.append(
            part.with_columns(
                pl.struct(
                    embedding=vectors,
                    inputTextTokenCount=pl.col(INPUT_TOKENS),
                    embeddingsByType=pl.struct(**by_type),
                )
                .struct.json_encode()
                .alias(MODEL_OUTPUT),
                pl.lit(0, dtype=pl.Int64).alias(OUTPUT_TOKENS),
            )
        )
    return pl.concat(parts).drop("_dims", "_norm", "_text_hash", "_types")


def _cohere_outputs(ok: pl.DataFrame, spec: ModelSpec) -> pl.DataFrame:
    # Embed v4, and v3 asked for embedding_types, answer embeddings keyed by type: each asked
    # type, and only those (model-parameters-embed-v3.html, -embed-v4.html, read 2026-12-07).
    by_type = "embed-v4" in spec.model_id
    request = pl.Struct({"texts": pl.List(pl.Utf8), "output_dimension": pl.Int64})
    types = _asked_types(ok, "embedding_types")
    others = sorted(set(types.explode().drop_nulls().to_list()) - {"float"})
    texts = (
        ok.select(
            pl.int_range(pl.len()).alias("_row"),
            pl.col(MODEL_INPUT).str.json_decode(request),
        )
        .select(
            "_row",
            pl.col(MODEL_INPUT)
            .struct.field("output_dimension")
            .fill_null(spec.default_dimension)
            .alias("_dims"),
            pl.col(MODEL_INPUT).struct.field("texts").alias("_text"),
        )
        .explode("_text")
        .with_columns(pl.col("_text").fill_null("").hash(seed=7).alias("_h"))
    )
    vectors = []
    for (dims,), part in texts.group_by("_dims", maintain_order=True):
        matrix = _embed_matrix(part["_h"].to_numpy(), int(dims), np.ones(part.height, dtype=bool))
        vectors.append(
            part.with_columns(
                pl.Series("float", matrix).arr.to_list(),
                *(pl.Series(k, _quantized(matrix, k)).arr.to_list() for k in others),
            )
        )
    per_row = (
        pl.concat(vectors)
        .group_by("_row", maintain_order=True)
        .agg(pl.col("_text").alias("texts"), pl.col("float", *others))
        .sort("_row")
        .with_columns(
            types.alias("_types"),
            (ok[_HASH] % 10**12).cast(pl.Utf8).str.zfill(12).alias("_id"),
        )
    )
    ident = pl.concat_str(pl.lit("emulated-"), pl.col("_id"))
    answers = []
    for (asked,), part in per_row.group_by(
        pl.col("_types").list.join(",").alias("_key"), maintain_order=True
    ):
        if asked is None and not by_type:
            body = pl.struct(
                id=ident,
                texts="texts",
                embeddings=pl.col("float"),
                response_type=pl.lit("embeddings_floats"),
            )
        else:
            kinds = asked.split(",") if asked else ["float"]
            body = pl.struct(
                id=ident,
                texts="texts",
                embeddings=pl.struct(*(pl.col(k) for k in dict.fromkeys(kinds))),
                response_type=pl.lit("embeddings_by_type"),
            )
        answers.append(part.select("_row", body.struct.json_encode().alias(MODEL_OUTPUT)))
    output = pl.concat(answers).sort("_row").get_column(MODEL_OUTPUT)
    return ok.with_columns(output, pl.lit(0, dtype=pl.Int64).alias(OUTPUT_TOKENS))


def count_tokens(model_input: str, spec: ModelSpec, invocation_type: str) -> tuple[int, str | None]:
    """(input tokens, None) of one request body, or (0, the 400 message a job would give it)."""
    frame = pl.DataFrame({MODEL_INPUT: [model_input]})
    row = frame.select(
        _error_message(spec, invocation_type).alias(ERROR_MESSAGE),
        input_token_count(spec, invocation_type).alias(INPUT_TOKENS),
    ).row(0, named=True)
    if row[ERROR_MESSAGE] is not None:
        return 0, row[ERROR_MESSAGE]
    return int(row[INPUT_TOKENS]), None


def respond(
    frame: pl.DataFrame,
    spec: ModelSpec,
    invocation_type: str = INVOKE_MODEL,
    schema_faults: pl.DataFrame | None = None,
):
    """Answer every record of `frame` (recordId, modelInput as JSON text) in one pass.

    Args:
        frame: one row per record; modelInput is the raw JSON of the request body.
        spec: the catalog entry of the model the job runs.
        invocation_type: InvokeModel (the family's body) or Converse.
        schema_faults: recordId and the `schema_error` fault kind of records whose structured
            answer is to be corrupted (emulator.structured).

    Returns:
        The frame with modelOutput (JSON text or null), errorCode/errorMessage (set for
        records whose body does not fit the model: 400) and input/output token counts.
    """
    # Lazy so repeated JSON-path lookups are computed once (common subexpression elimination).
    base = (
        frame.lazy()
        .select(RECORD_ID, MODEL_INPUT)
        .with_columns(
            pl.col(MODEL_INPUT).hash(seed=0).alias(_HASH),
            _error_message(spec, invocation_type).alias(ERROR_MESSAGE),
            input_token_count(spec, invocation_type).alias(INPUT_TOKENS),
        )
        .collect()
    )
    bad = base.filter(pl.col(ERROR_MESSAGE).is_not_null()).with_columns(
        pl.lit(None, dtype=pl.Utf8).alias(MODEL_OUTPUT),
        pl.lit(400, dtype=pl.Int64).alias(ERROR_CODE),
        pl.lit(0, dtype=pl.Int64).alias(INPUT_TOKENS),
        pl.lit(0, dtype=pl.Int64).alias(OUTPUT_TOKENS),
    )
    ok = base.filter(pl.col(ERROR_MESSAGE).is_null())
    if ok.height and spec.family == TITAN_EMBED and invocation_type == INVOKE_MODEL:
        ok = _titan_outputs(ok, spec)
    elif ok.height and spec.family == COHERE_EMBED and invocation_type == INVOKE_MODEL:
        ok = _cohere_outputs(ok, spec)
    else:
        ok = (
            ok.with_row_index("__i")
            .with_columns(_user_text(spec, invocation_type).alias(QUOTE))
            .with_columns(quote(pl.col(QUOTE)))
        )
        if schema_faults is not None:
            ok = ok.join(schema_faults, on=RECORD_ID, how="left", maintain_order="left")
        tool_ok = spec.family == ANTHROPIC and invocation_type == INVOKE_MODEL
        ok = add_answers(ok, MODEL_INPUT, _HASH, tool_ok)
        output, out_tokens = _text_output(spec, invocation_type)
        ok = (
            ok.lazy()
            .with_columns(output.alias(MODEL_OUTPUT), out_tokens.alias(OUTPUT_TOKENS))
            .collect()
        )
    ok = ok.with_columns(pl.lit(None, dtype=pl.Int64).alias(ERROR_CODE))
    return pl.concat(
        [ok.select(OUTPUT_COLUMNS), bad.select(OUTPUT_COLUMNS)], how="vertical_relaxed"
    )


def output_lines(frame: pl.DataFrame) -> pl.Series:
    """One Bedrock output line per record: modelOutput, or error{errorCode, errorMessage}.

    Real output lines come as {"modelInput", "modelOutput", "recordId"}, in that key order
    (DESIGN.md, from public batch outputs); error lines keep the same order with "error" in
    the place of "modelOutput" (assumed: no public error line was found to copy).
    """
    tail = pl.struct(pl.col(RECORD_ID)).struct.json_encode().str.strip_prefix("{")
    error = pl.struct(
        errorCode=pl.col(ERROR_CODE), errorMessage=pl.col(ERROR_MESSAGE)
    ).struct.json_encode()
    line = pl.concat_str(
        pl.lit('{"modelInput":'),
        pl.col(MODEL_INPUT),
        pl.when(pl.col(ERROR_CODE).is_null())
        .then(pl.concat_str(pl.lit(',"modelOutput":'), pl.col(MODEL_OUTPUT)))
        .otherwise(pl.concat_str(pl.lit(',"error":'), error)),
        pl.lit(","),
        tail,
    )
    return frame.select(line.alias("line")).to_series()
