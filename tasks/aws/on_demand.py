"""Finishing a remainder too small for a batch job through bedrock-runtime, rate-limited."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import polars as pl
from botocore.exceptions import ClientError
from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.concurrency.sync import rate_limit
from prefect.exceptions import ObjectAlreadyExists

from tasks.aws.clients import client, error_code
from tasks.bedrock.error_codes import RETRYABLE_RUNTIME
from tasks.files import LINE, scan_lines
from tasks.pipeline.outputs import HEADER_TOKENS
from tasks.run.gate import gate_name

_TRIES = 5
_INPUT_HEADER = "x-amzn-bedrock-input-token-count"
_OUTPUT_HEADER = "x-amzn-bedrock-output-token-count"


def read_jsonl_lines(data: bytes) -> pl.DataFrame:
    """Raw JSONL lines with their recordId, without decoding the bodies."""
    return (
        scan_lines(data)
        .collect()
        .with_columns(pl.col(LINE).str.json_path_match("$.recordId").alias("recordId"))
    )


def select_lines(data: bytes, record_ids: list[str], keep: bool = True) -> bytes:
    """The JSONL lines of ``data`` whose recordId is (``keep``) or is not in ``record_ids``."""
    inside = pl.col("recordId").is_in(record_ids)
    lines = read_jsonl_lines(data).filter(inside if keep else ~inside)
    if lines.is_empty():
        return b""
    return ("\n".join(lines.get_column(LINE).to_list()) + "\n").encode()


def record_ids_of(data: bytes) -> list[str]:
    """Every recordId in a JSONL input."""
    return read_jsonl_lines(data).get_column("recordId").to_list()


def ensure_rate_limit(model_id: str, requests_per_second: float) -> str:
    """A Prefect rate limit (slots that decay) for on-demand calls to one model."""
    name = gate_name(model_id) + "-on-demand"
    limit = max(1, int(round(requests_per_second)))
    with get_client(sync_client=True) as prefect:
        try:
            prefect.upsert_global_concurrency_limit_by_name(
                name, limit, slot_decay_per_second=requests_per_second
            )
        except ObjectAlreadyExists:
            # Prefect's upsert reads, then creates: two shards' tails starting together race
            # to create it. The limit exists now; the second upsert updates it.
            prefect.upsert_global_concurrency_limit_by_name(
                name, limit, slot_decay_per_second=requests_per_second
            )
    return name


def header_tokens(response: dict) -> dict[str, int]:
    """The token counts an InvokeModel answer carries in its headers (those it has).

    Bedrock sends ``X-Amzn-Bedrock-Input-Token-Count`` (and, for text models,
    ``X-Amzn-Bedrock-Output-Token-Count``) on InvokeModel answers, Cohere Embed's included,
    whose bodies count no tokens. botocore's model does not map them (InvokeModelResponse has
    body, contentType, performanceConfigLatency, serviceTier), so they are read from
    ResponseMetadata.HTTPHeaders, whose names botocore lowercases (AWS's sample
    aws-samples/sample-amazon-bedrock-global-cris simple_cohere_embed_example.py; Cohere's SDK,
    cohere-ai/cohere-python src/cohere/aws_client.py `map_token_counts`; read 2026-12-09).
    """
    headers = response.get("ResponseMetadata", {}).get("HTTPHeaders", {})
    counts = {}
    for key, header in (("input", _INPUT_HEADER), ("output", _OUTPUT_HEADER)):
        value = str(headers.get(header, "")).strip()
        if value.isdigit():
            counts[key] = int(value)
    return counts


def _invoke(model_id: str, invocation_type: str, model_input: dict) -> tuple[dict, dict]:
    """(the model's answer, the token counts of its headers)."""
    runtime = client("bedrock-runtime")
    if invocation_type == "Converse":
        response = runtime.converse(modelId=model_id, **model_input)
        return {k: response[k] for k in ("output", "stopReason", "usage") if k in response}, {}
    response = runtime.invoke_model(
        modelId=model_id,
        body=json.dumps(model_input),
        contentType="application/json",
        accept="application/json",
    )
    return json.loads(response["body"].read()), header_tokens(response)


def _serve_line(model_id: str, invocation_type: str, limit: str, line: str) -> dict:
    record = json.loads(line)
    out = {"recordId": record["recordId"], "modelInput": record["modelInput"]}
    for attempt in range(_TRIES):
        if attempt:
            rate_limit(limit, strict=True)
        try:
            out["modelOutput"], counts = _invoke(model_id, invocation_type, record["modelInput"])
            if counts:
                # Beside the answer, not in it: the parse takes them where the body has none.
                out[HEADER_TOKENS] = counts
            return out
        except ClientError as exc:
            code = error_code(exc)
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 400)
            if code in RETRYABLE_RUNTIME and attempt < _TRIES - 1:
                time.sleep(min(2**attempt, 30))
                continue
            message = exc.response.get("Error", {}).get("Message", str(exc))
            out["error"] = {"errorCode": status, "errorMessage": f"{code}: {message}"}
            return out
    return out


@task(task_run_name="on-demand-{label}", cache_policy=NO_CACHE)
def serve_on_demand(
    label: str,
    model_id: str,
    invocation_type: str,
    lines: bytes,
    requests_per_second: float,
    keep: Callable[[str, bytes], None],
) -> int:
    """Invoke the model once per record, handing each batch of answers to ``keep`` at once.

    ``keep(first_record_id, jsonl)`` must make the batch durable before the next one is paid
    for, so a crash re-pays at most the batch in flight; the caller sends only the records that
    have no kept answer yet.

    Args:
        label: names the task run (the shard and attempt).
        model_id: the model.
        invocation_type: InvokeModel or Converse.
        lines: the JSONL input lines of the records still to serve.
        requests_per_second: the rate limit for this model's on-demand calls.
        keep: stores one batch of output lines, shaped like a batch ``.out`` file.

    Returns:
        The number of records served.
    """
    records = read_jsonl_lines(lines).get_column(LINE).to_list() if lines.strip() else []
    if not records:
        return 0
    limit = ensure_rate_limit(model_id, requests_per_second)
    get_run_logger().info("Serving %d records on demand through bedrock-runtime", len(records))
    # A handful of records (fewer than one job's minimum): a loop of API calls is the job here.
    # Slots are taken a second's worth at a time; one server round trip per call is too slow.
    chunk = max(1, int(requests_per_second))
    for start in range(0, len(records), chunk):
        batch = records[start : start + chunk]
        rate_limit(limit, occupy=len(batch), strict=True)
        served = [_serve_line(model_id, invocation_type, limit, line) for line in batch]
        keep(served[0]["recordId"], ("\n".join(json.dumps(s) for s in served) + "\n").encode())
    return len(records)
