"""The job runner's data work: read input JSONL from S3, answer it in one pass, write outputs."""

from __future__ import annotations

import json
import string
from dataclasses import dataclass
from urllib.parse import urlparse

import numpy as np
import polars as pl
from botocore.exceptions import ClientError

from .catalog import ModelSpec
from .faults import Faults
from .responders import (
    ERROR_CODE,
    ERROR_MESSAGE,
    INPUT_TOKENS,
    MODEL_INPUT,
    OUTPUT_TOKENS,
    RECORD_ID,
    output_lines,
    respond,
)

FILE = "file"
LINE = "line"
# "Your JSONL file must end in the extension .jsonl" (AWS user guide, "Format and upload your
# batch inference data"); Validating checks "Your files are .jsonl files" (botocore's
# GetModelInvocationJobResponse.status).
JSONL_EXTENSION = ".jsonl"


class InputError(Exception):
    """The job's input breaks a Bedrock rule; the job fails with this message."""


@dataclass(frozen=True)
class InputFile:
    """One input object: its key, the name its output takes, and its size."""

    bucket: str
    key: str
    name: str
    size: int


@dataclass
class JobResults:
    """A job's answered records in processing order, with running totals for the counters."""

    frame: pl.DataFrame  # file, line, errorCode, inputTokens, outputTokens
    cum_errors: np.ndarray
    cum_input_tokens: np.ndarray
    cum_output_tokens: np.ndarray

    @property
    def total(self) -> int:
        """Number of records."""
        return self.frame.height

    def counters(self, processed: int) -> tuple[int, int, int, int]:
        """(success, error, input tokens, output tokens) once the first `processed` are done."""
        if processed <= 0:
            return 0, 0, 0, 0
        i = processed - 1
        errors = int(self.cum_errors[i])
        return (
            processed - errors,
            errors,
            int(self.cum_input_tokens[i]),
            int(self.cum_output_tokens[i]),
        )


def split_s3_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/key → (bucket, key)."""
    parsed = urlparse(uri)
    return parsed.netloc, parsed.path.lstrip("/")


def list_inputs(s3, uri: str) -> list[InputFile]:
    """The objects a job reads: the object itself, or every .jsonl under the prefix.

    An object given by its key is taken whatever its name: Bedrock accepts the job and fails
    it in Validating when the name does not end in .jsonl (`check_extension`).
    """
    bucket, key = split_s3_uri(uri)
    if key and not key.endswith("/"):
        try:
            head = s3.head_object(Bucket=bucket, Key=key)
        except Exception as exc:  # noqa: BLE001 - a missing object means "treat it as a prefix"
            if _denied(exc):
                # The job's role may not read it: the job starts and fails reading it, as
                # Bedrock's do, instead of a misleading "no .jsonl object" at create.
                return [InputFile(bucket, key, key.rsplit("/", 1)[-1], 0)]
            head = None
        if head is not None:
            return [InputFile(bucket, key, key.rsplit("/", 1)[-1], head["ContentLength"])]
    prefix = key if not key or key.endswith("/") else key + "/"
    files = []
    for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith(JSONL_EXTENSION):
                name = obj["Key"][len(prefix) :]
                files.append(InputFile(bucket, obj["Key"], name, obj["Size"]))
    return files


def _denied(exc: Exception) -> bool:
    """An S3 refusal of the caller (403), not a missing object."""
    error = getattr(exc, "response", {}).get("Error", {})
    return error.get("Code") in ("403", "AccessDenied", "Forbidden")


def check_extension(file: InputFile) -> None:
    """Fail the job when an input object's name does not end in .jsonl."""
    if not file.key.endswith(JSONL_EXTENSION):
        msg = (
            f"Input file s3://{file.bucket}/{file.key} does not end in the extension .jsonl: "
            "Bedrock reads only JSONL files named *.jsonl. Rename the object (or give a prefix "
            "with .jsonl files under it) and submit the job again"
        )
        raise InputError(msg)


# A string value right after the key. Inside another string the key's quotes are escaped
# (\"modelInput\"), so a match is the line's own key.
_STRING_MODEL_INPUT = r'"modelInput"\s*:\s*"'


def _model_input_is_object() -> pl.Expr:
    """Whether the line's modelInput is a JSON object, not a string, number, array or bool.

    `json_path_match` returns a string value without its quotes, so a string holding an
    object's text (a twice-encoded modelInput) starts with "{" like an object: the line's
    own text tells a string apart (a regex; a second JSON path per line cost the emulator's
    jobs 9 ms a 2,000-record file, and the refill benchmark ~0.4 s of makespan).
    """
    extracted = pl.col(MODEL_INPUT)
    return extracted.str.starts_with("{") & ~pl.col(LINE).str.contains(_STRING_MODEL_INPUT)


def parse_input(data: bytes, source: str, first_index: int = 0) -> pl.DataFrame:
    """Lines of one input file → (recordId, modelInput); a malformed line fails the job.

    Validating checks that "each individual record is a JSON object in the correct format"
    (botocore's GetModelInvocationJobResponse.status), the format being {"recordId": ...,
    "modelInput": {JSON body}} (AWS user guide, "Format and upload your batch inference
    data"). A record without a recordId keeps a null one here; `fill_record_ids` assigns it
    per job. `first_index` is unused and kept for callers that pass it.
    """
    # JSON Lines end at "\n" (a "\r" before it is JSON white space); str.splitlines() also
    # cut at U+2028, U+2029 and U+0085, which JSON leaves raw inside a prompt's string.
    lines = pl.Series(LINE, data.decode("utf-8", errors="replace").split("\n"))
    frame = (
        lines.to_frame()
        .with_row_index("_n", offset=1)
        .filter(pl.col(LINE).str.strip_chars() != "")
        .with_columns(
            pl.col(LINE).str.json_path_match("$.modelInput").alias(MODEL_INPUT),
            pl.col(LINE).str.json_path_match("$.recordId").alias(RECORD_ID),
        )
        .with_columns(_model_input_is_object().alias("_object"))
    )
    # Invalid JSON yields no modelInput, so one test finds every kind of malformed line.
    bad = frame.filter(pl.col(MODEL_INPUT).is_null() | ~pl.col("_object"))
    if bad.height:
        first = bad.head(1).with_columns(pl.col(LINE).str.json_path_match("$").alias("_whole"))
        first = first.row(0, named=True)
        if first["_whole"] is None:
            reason = "not valid JSON"
        elif first[MODEL_INPUT] is None:
            reason = "no modelInput"
        else:
            reason = "modelInput is not a JSON object"
        msg = (
            f"Malformed input: {bad.height} line(s) in {source} are not "
            f'{{"recordId": "...", "modelInput": {{...}}}} objects; first at line '
            f"{first['_n']} ({reason})."
        )
        raise InputError(msg)
    return frame.select(pl.col(RECORD_ID), pl.col(MODEL_INPUT))


RECORD_ID_ALPHABET = string.ascii_letters + string.digits
RECORD_ID_LENGTH = 11


def fill_record_ids(
    inputs: list[tuple[str, pl.DataFrame]], seed: int
) -> list[tuple[str, pl.DataFrame]]:
    """Give every record without a recordId a random 11-character alphanumeric one.

    Bedrock "adds it in the output" when a line omits recordId (AWS user guide, "Format and
    upload your batch inference data"); real outputs show ids such as `bFBEdQuy3Gp`. The draw
    is seeded, so a job's ids repeat with its seed, and unique within the job, given ids
    included.
    """
    missing = sum(frame[RECORD_ID].null_count() for _, frame in inputs)
    if not missing:
        return inputs
    given = {v for _, frame in inputs for v in frame[RECORD_ID].drop_nulls().unique().to_list()}
    rng = np.random.default_rng(seed)
    alphabet = np.array(list(RECORD_ID_ALPHABET))
    ids: list[str] = []
    while len(ids) < missing:
        draw = alphabet[rng.integers(0, len(alphabet), size=(missing - len(ids), RECORD_ID_LENGTH))]
        fresh = pl.Series(draw.view(f"<U{RECORD_ID_LENGTH}").ravel()).unique(maintain_order=True)
        taken = given | set(ids)
        ids.extend(v for v in fresh.to_list() if v not in taken)
    filled, start = [], 0
    for name, frame in inputs:
        column = frame[RECORD_ID]
        holes = column.is_null().arg_true()
        if len(holes):
            column = column.clone().scatter(holes, ids[start : start + len(holes)])
            start += len(holes)
        filled.append((name, frame.with_columns(column)))
    return filled


def answer(
    inputs: list[tuple[str, pl.DataFrame]],
    spec: ModelSpec,
    invocation_type: str,
    faults: Faults,
    job_name: str,
    order_seed: int,
) -> JobResults:
    """Answer every record of a job at once and fix the (unordered) processing order."""
    parts = []
    for name, frame in inputs:
        schema_faults = faults.schema_errors(job_name, frame[RECORD_ID])
        answered = respond(frame, spec, invocation_type, schema_faults)
        injected = faults.record_errors(job_name, answered[RECORD_ID])
        hit = injected[ERROR_CODE].is_not_null() & answered[ERROR_CODE].is_null()
        answered = answered.with_columns(
            pl.when(hit).then(injected[ERROR_CODE]).otherwise(pl.col(ERROR_CODE)).alias(ERROR_CODE),
            pl.when(hit)
            .then(injected[ERROR_MESSAGE])
            .otherwise(pl.col(ERROR_MESSAGE))
            .alias(ERROR_MESSAGE),
            pl.when(hit).then(0).otherwise(pl.col(INPUT_TOKENS)).alias(INPUT_TOKENS),
            pl.when(hit).then(0).otherwise(pl.col(OUTPUT_TOKENS)).alias(OUTPUT_TOKENS),
        )
        parts.append(
            answered.select(
                pl.lit(name).alias(FILE),
                output_lines(answered),
                ERROR_CODE,
                INPUT_TOKENS,
                OUTPUT_TOKENS,
            )
        )
    frame = pl.concat(parts)
    order = np.random.default_rng(order_seed).permutation(frame.height)
    frame = frame[order]
    return JobResults(
        frame=frame,
        cum_errors=np.cumsum(frame[ERROR_CODE].is_not_null().to_numpy()),
        cum_input_tokens=np.cumsum(frame[INPUT_TOKENS].to_numpy()),
        cum_output_tokens=np.cumsum(frame[OUTPUT_TOKENS].to_numpy()),
    )


def _output_base(output_uri: str, job_id: str) -> tuple[str, str]:
    """(bucket, key prefix) of a job's outputs: `<outputUri>/<jobId>`."""
    bucket, prefix = split_s3_uri(output_uri)
    prefix = prefix.rstrip("/")
    return bucket, f"{prefix}/{job_id}" if prefix else job_id


def _sse(kms_key_id: str | None) -> dict:
    return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": kms_key_id} if kms_key_id else {}


def probe_output(s3, output_uri: str, job_id: str, kms_key_id: str | None = None) -> None:
    """Ask S3 whether the job may write its outputs, without writing anything.

    A PutObject of the manifest's key with If-Match on an object that does not exist yet: S3
    authorizes the write (s3:PutObject, the one grant writing outputs needs) and finds the
    bucket before it tests the precondition, which then fails (404 NoSuchKey, or 412), so
    nothing is stored. AccessDenied and NoSuchBucket come back as ClientError. HeadBucket
    would need s3:ListBucket on the whole bucket, which a role writing outputs need not have.
    """
    bucket, base = _output_base(output_uri, job_id)
    try:
        s3.put_object(
            Bucket=bucket,
            Key=f"{base}/manifest.json.out",
            Body=b"",
            IfMatch='"probe"',
            **_sse(kms_key_id),
        )
    except ClientError as exc:
        code = exc.response.get("Error", {}).get("Code")
        if code not in ("NoSuchKey", "404", "PreconditionFailed", "412"):
            raise


def write_outputs(
    s3,
    output_uri: str,
    job_id: str,
    files: list[InputFile],
    results: JobResults,
    processed: int,
    kms_key_id: str | None = None,
) -> None:
    """Write `<outputUri>/<jobId>/<input>.out` for the processed records and the manifest."""
    sse = _sse(kms_key_id)
    bucket, base = _output_base(output_uri, job_id)
    done = results.frame.head(processed)
    by_file = {name: group for (name,), group in done.group_by(FILE)}
    for file in files:
        group = by_file.get(file.name)
        body = "" if group is None else group[LINE].str.join("\n").item() + "\n"
        s3.put_object(Bucket=bucket, Key=f"{base}/{file.name}.out", Body=body.encode(), **sse)
    success, errors, input_tokens, output_tokens = results.counters(processed)
    manifest = {
        "totalRecordCount": results.total,
        "processedRecordCount": processed,
        "successRecordCount": success,
        "errorRecordCount": errors,
        "inputTokenCount": input_tokens,
        "outputTokenCount": output_tokens,
    }
    s3.put_object(
        Bucket=bucket, Key=f"{base}/manifest.json.out", Body=json.dumps(manifest).encode(), **sse
    )
