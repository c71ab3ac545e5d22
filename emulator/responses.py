"""HTTP handlers: parse a request, call the backend, answer with the JSON botocore expects."""

from __future__ import annotations

import base64
import binascii
import functools
import json
import re
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable

import polars as pl
from werkzeug.wrappers import Request, Response

from .catalog import ANTHROPIC, CATALOG, lookup
from .exceptions import (
    BedrockError,
    ResourceNotFoundException,
    ThrottlingException,
    ValidationException,
)
from .responders import (
    CONVERSE,
    ERROR_MESSAGE,
    INPUT_TOKENS,
    INVOKE_MODEL,
    MODEL_OUTPUT,
    OUTPUT_TOKENS,
    count_tokens,
    respond,
)
from .state import EmulatorServerState
from .validation import parse_timestamp

# Families whose models answer CountTokens. On AWS it is some Anthropic Claude models; others
# (Nova, profile ids of some Claude models) are refused with "The provided model doesn't
# support counting tokens" (AWS user guide "count-tokens", read 2026-11-22).
COUNT_TOKENS_FAMILIES = frozenset({ANTHROPIC})
# The members of a Converse request CountTokens takes (botocore ConverseTokensRequest).
_CONVERSE_TOKENS_MEMBERS = ("messages", "system", "toolConfig", "additionalModelRequestFields")

_REGION = re.compile(r"Credential=[^/]+/\d{8}/(?P<region>[a-z0-9-]+)/")


def _json(payload, status: int = 200) -> Response:
    return Response(json.dumps(payload), status=status, content_type="application/json")


def error_response(error: BedrockError) -> Response:
    """The error document and headers botocore maps to client.exceptions.<Code>."""
    return Response(error.body(), status=error.status, headers=error.headers())


def _body(request: Request) -> dict:
    raw = request.get_data()
    if not raw:
        return {}
    try:
        body = json.loads(raw)
    except ValueError:
        msg = "The request body is not valid JSON"
        raise ValidationException(msg) from None
    if not isinstance(body, dict):
        msg = "The request body must be a JSON object"
        raise ValidationException(msg)
    return body


def _decoded_body(raw) -> str:
    """The InvokeModel body of a CountTokens request: a blob, base64 in the JSON protocol."""
    try:
        text = base64.b64decode(raw or "", validate=True).decode()
        body = json.loads(text)
    except (binascii.Error, UnicodeDecodeError, ValueError, TypeError):
        msg = "The provided input.invokeModel.body is not base64-encoded JSON"
        raise ValidationException(msg) from None
    if not isinstance(body, dict):
        msg = "The provided input.invokeModel.body must be a JSON object"
        raise ValidationException(msg)
    return text


# Bedrock's InvokeModel answers carry the invocation's token counts in these headers, also
# for models whose bodies count none (Cohere Embed). botocore's bedrock-runtime model does
# not list them (InvokeModelResponse: body, contentType, performanceConfigLatency,
# serviceTier), so clients read them from ResponseMetadata.HTTPHeaders, as AWS's own sample
# does for Cohere Embed v4 (aws-samples/sample-amazon-bedrock-global-cris,
# simple_cohere_embed_example.py: input count only, "embedding models only consume input
# tokens") and Cohere's SDK does for both counts (cohere-ai/cohere-python
# src/cohere/aws_client.py `map_token_counts`, PR #537); read 2026-12-09. No public embedding
# response was found to show an output count, so embedding models send the input one alone.
INPUT_TOKEN_HEADER = "X-Amzn-Bedrock-Input-Token-Count"
OUTPUT_TOKEN_HEADER = "X-Amzn-Bedrock-Output-Token-Count"


def _token_headers(row: dict) -> dict[str, str]:
    """The token-count headers of one InvokeModel answer (`_runtime`'s row)."""
    headers = {INPUT_TOKEN_HEADER: str(row[INPUT_TOKENS])}
    if not row["embedding"]:
        headers[OUTPUT_TOKEN_HEADER] = str(row[OUTPUT_TOKENS])
    return headers


class ApiCalls:
    """Bedrock calls counted by operation, with per-second counts to chart calls per minute.

    `calls` is every request an operation's route received, throttled and failed ones
    included; `throttled` (answered ThrottlingException) and `errors` (any other error) are
    the parts of it that did nothing. Seconds are whole Unix epoch seconds of arrival.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        """Forget every count; `since` becomes now."""
        with self._lock:
            self.since = time.time()
            self._outcomes: dict[str, Counter[str]] = defaultdict(Counter)
            self._seconds: dict[str, Counter[int]] = defaultdict(Counter)

    def count(self, operation: str, arrived: float, outcome: str) -> None:
        """One call of `operation` that arrived at `arrived` and ended as `outcome`."""
        with self._lock:
            self._outcomes[operation][outcome] += 1
            self._seconds[operation][int(arrived)] += 1

    def snapshot(self) -> dict:
        """JSON view: per operation calls, throttled, errors and calls per epoch second."""
        with self._lock:
            operations = {
                name: {
                    "calls": sum(outcomes.values()),
                    "throttled": outcomes["throttled"],
                    "errors": outcomes["error"],
                    "per_second": {str(s): n for s, n in sorted(self._seconds[name].items())},
                }
                for name, outcomes in sorted(self._outcomes.items())
            }
            return {"since": self.since, "now": time.time(), "operations": operations}


def counted(operation: str) -> Callable:
    """Count each call of the decorated handler as `operation`.

    The names are botocore's operation keys (data/bedrock/2023-04-20 and
    data/bedrock-runtime/2023-09-30 service-2.json, "operations").
    """

    def decorate(handler: Callable[..., Response]) -> Callable[..., Response]:
        @functools.wraps(handler)
        def handle(self: BedrockResponses, request: Request, **args) -> Response:
            arrived, outcome = time.time(), "error"
            try:
                response = handler(self, request, **args)
                outcome = "ok"
                return response
            except ThrottlingException:
                outcome = "throttled"
                raise
            finally:
                self.calls.count(operation, arrived, outcome)

        return handle

    return decorate


class _Params:
    """A request's JSON body and query string, read by member name (moto's `_get_param`)."""

    def __init__(self, request: Request):
        self.body = _body(request)
        self.query = request.args

    def get(self, name: str, default=None):
        """A member of the JSON body."""
        return self.body.get(name, default)

    def get_dict(self, name: str) -> dict | None:
        """A member that must be a JSON object when present."""
        value = self.body.get(name)
        if value is not None and not isinstance(value, dict):
            msg = f"1 validation error detected: Value at '{name}' failed to satisfy constraint: "
            msg += "Member must be a structure"
            raise ValidationException(msg)
        return value

    def query_str(self, name: str) -> str | None:
        """A query-string member, None when absent or empty."""
        return self.query.get(name) or None

    def query_int(self, name: str) -> int | str | None:
        """A query-string integer; a non-number is passed on for validation to report."""
        raw = self.query_str(name)
        if raw is None:
            return None
        try:
            return int(raw)
        except ValueError:
            return raw


class BedrockResponses:
    """Handlers for the bedrock control plane, bedrock-runtime and the /_emulator admin API."""

    def __init__(self, state: EmulatorServerState):
        self.state = state
        self.calls = ApiCalls()

    def _backend(self, request: Request):
        match = _REGION.search(request.headers.get("Authorization", ""))
        return self.state.backend(match.group("region") if match else None)

    def _latency(self) -> None:
        delay = self.state.config.faults.latency_ms
        if delay:
            # Added latency is the fault itself: the call is meant to be slow.
            time.sleep(delay / 1000)

    # -- bedrock ------------------------------------------------------------------------

    @counted("CreateModelInvocationJob")
    def create_model_invocation_job(self, request: Request) -> Response:
        self._latency()
        params = _Params(request)
        job = self._backend(request).create_model_invocation_job(
            job_name=params.get("jobName"),
            role_arn=params.get("roleArn"),
            model_id=params.get("modelId"),
            input_data_config=params.get("inputDataConfig"),
            output_data_config=params.get("outputDataConfig"),
            client_request_token=params.get("clientRequestToken"),
            vpc_config=params.get("vpcConfig"),
            timeout_duration_in_hours=params.get("timeoutDurationInHours"),
            tags=params.get("tags"),
            model_invocation_type=params.get("modelInvocationType"),
        )
        return _json({"jobArn": job.arn})

    @counted("GetModelInvocationJob")
    def get_model_invocation_job(self, request: Request, job_identifier: str) -> Response:
        self._latency()
        backend = self._backend(request)
        job = backend.get_model_invocation_job(job_identifier)
        with backend.lock:
            return _json(job.describe())

    @counted("ListModelInvocationJobs")
    def list_model_invocation_jobs(self, request: Request) -> Response:
        self._latency()
        params = _Params(request)
        backend = self._backend(request)
        jobs, token = backend.list_model_invocation_jobs(
            submit_time_after=parse_timestamp(
                "submitTimeAfter", params.query_str("submitTimeAfter")
            ),
            submit_time_before=parse_timestamp(
                "submitTimeBefore", params.query_str("submitTimeBefore")
            ),
            status_equals=params.query_str("statusEquals"),
            name_contains=params.query_str("nameContains"),
            max_results=params.query_int("maxResults"),
            next_token=params.query_str("nextToken"),
            sort_by=params.query_str("sortBy"),
            sort_order=params.query_str("sortOrder"),
        )
        with backend.lock:
            payload = {"invocationJobSummaries": [j.describe() for j in jobs]}
        if token:
            payload["nextToken"] = token
        return _json(payload)

    @counted("StopModelInvocationJob")
    def stop_model_invocation_job(self, request: Request, job_identifier: str) -> Response:
        self._latency()
        self._backend(request).stop_model_invocation_job(job_identifier)
        return _json({})

    # -- bedrock-runtime ----------------------------------------------------------------

    def _runtime(self, model_id: str, model_input: dict, invocation_type: str) -> dict:
        self._latency()
        self.state.check_throttle("invoke")
        spec = lookup(model_id)
        if spec is None:
            msg = (
                f"The provided model identifier {model_id!r} is invalid. Known model ids: "
                f"{', '.join(sorted(CATALOG))}"
            )
            raise ValidationException(msg)
        if invocation_type == CONVERSE and not spec.converse:
            msg = f"This action doesn't support the model that you provided ({model_id})."
            raise ValidationException(msg)
        frame = pl.DataFrame({"recordId": ["runtime"], "modelInput": [json.dumps(model_input)]})
        row = respond(frame, spec, invocation_type).row(0, named=True)
        if row[ERROR_MESSAGE] is not None:
            raise ValidationException(row[ERROR_MESSAGE])
        return {**row, "embedding": spec.embedding}

    @counted("InvokeModel")
    def invoke_model(self, request: Request, model_id: str) -> Response:
        body = _body(request)
        row = self._runtime(model_id, body, INVOKE_MODEL)
        return Response(
            row[MODEL_OUTPUT],
            status=200,
            content_type="application/json",
            headers=_token_headers(row),
        )

    @counted("Converse")
    def converse(self, request: Request, model_id: str) -> Response:
        body = _body(request)
        body.pop("modelId", None)
        output = self._runtime(model_id, body, CONVERSE)[MODEL_OUTPUT]
        return Response(output, status=200, content_type="application/json")

    @counted("CountTokens")
    def count_tokens(self, request: Request, model_id: str) -> Response:
        """CountTokens: the input tokens a job or InvokeModel would report for this request."""
        self._latency()
        self.state.check_throttle("invoke")
        params = _Params(request)
        request_input = params.get_dict("input")
        chosen = [k for k in ("invokeModel", "converse") if (request_input or {}).get(k)]
        if len(chosen) != 1:
            msg = (
                "1 validation error detected: Value at 'input' failed to satisfy constraint: "
                "Member must have exactly one of invokeModel, converse set"
            )
            raise ValidationException(msg)
        spec = lookup(model_id)
        if spec is None or spec.family not in COUNT_TOKENS_FAMILIES:
            msg = f"The provided model doesn't support counting tokens ({model_id})."
            raise ValidationException(msg)
        if chosen[0] == "invokeModel":
            body = _decoded_body(request_input["invokeModel"].get("body"))
            invocation_type = INVOKE_MODEL
        else:
            converse = request_input["converse"]
            members = {k: converse[k] for k in _CONVERSE_TOKENS_MEMBERS if k in converse}
            body, invocation_type = json.dumps(members), CONVERSE
        tokens, problem = count_tokens(body, spec, invocation_type)
        if problem is not None:
            raise ValidationException(problem)
        return _json({"inputTokens": tokens})

    # -- admin --------------------------------------------------------------------------

    def admin_ledger(self, request: Request) -> Response:
        return _json(self.state.ledger_entries(request.args.get("nameContains")))

    def admin_calls(self, request: Request) -> Response:
        return _json(self.calls.snapshot())

    def admin_calls_reset(self, request: Request) -> Response:
        self.calls.reset()
        return _json(self.calls.snapshot())

    def admin_state(self, request: Request) -> Response:
        return _json(self.state.config.to_dict())

    def admin_faults(self, request: Request) -> Response:
        try:
            self.state.set_faults(**_body(request))
        except (TypeError, ValueError) as exc:
            raise ValidationException(str(exc)) from None
        return _json(self.state.config.to_dict())

    def admin_config(self, request: Request) -> Response:
        try:
            self.state.configure(**_body(request))
        except (TypeError, ValueError) as exc:
            raise ValidationException(str(exc)) from None
        return _json(self.state.config.to_dict())

    def admin_reset(self, request: Request) -> Response:
        self.state.reset()
        return _json(self.state.config.to_dict())

    def admin_health(self, request: Request) -> Response:
        return _json({"status": "ok"})


def not_found(path: str) -> BedrockError:
    """What an unknown route answers."""
    return ResourceNotFoundException(f"No emulated operation at {path}")
