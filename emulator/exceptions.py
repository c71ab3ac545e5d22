"""Exceptions raised by the emulated bedrock and bedrock-runtime services."""

from __future__ import annotations

import json

from tasks.bedrock import error_codes as codes


class BedrockError(Exception):
    """An AWS error as botocore reads it: JSON `__type` and `message`, X-Amzn-ErrorType, status."""

    code = codes.INTERNAL
    status = 500

    def __init__(self, message: str):
        super().__init__(message)
        self.message = message

    def body(self) -> bytes:
        """The JSON error document."""
        return json.dumps({"__type": self.code, "message": self.message}).encode()

    def headers(self) -> dict[str, str]:
        """Headers botocore uses to pick the exception class."""
        return {
            "Content-Type": "application/json",
            "X-Amzn-ErrorType": f"{self.code}:http://internal.amazon.com/coral/com.amazon.bedrock/",
        }


class ValidationException(BedrockError):
    """The input fails to satisfy the constraints of the operation."""

    code = codes.VALIDATION
    status = 400


class ServiceQuotaExceededException(BedrockError):
    """A service quota (here: jobs submitted or in progress per model) would be exceeded."""

    code = codes.QUOTA_EXCEEDED
    status = 400


class ThrottlingException(BedrockError):
    """The request was denied because of request throttling."""

    code = codes.THROTTLING
    status = 429


class ResourceNotFoundException(BedrockError):
    """The job (or model) named in the request does not exist."""

    code = codes.NOT_FOUND
    status = 404


class ConflictException(BedrockError):
    """The request conflicts with the current state of the job."""

    code = codes.CONFLICT
    status = 400


class AccessDeniedException(BedrockError):
    """The caller may not perform the action."""

    code = codes.ACCESS_DENIED
    status = 403


class InternalServerException(BedrockError):
    """An internal server error occurred; retry the request."""

    code = codes.INTERNAL
    status = 500


class ModelTimeoutException(BedrockError):
    """The model did not answer in time (bedrock-runtime)."""

    code = codes.MODEL_TIMEOUT
    status = 408


class ServiceUnavailableException(BedrockError):
    """The service is temporarily unavailable (bedrock-runtime)."""

    code = codes.UNAVAILABLE
    status = 503


class ModelErrorException(BedrockError):
    """The model returned an error while processing the request (bedrock-runtime)."""

    code = codes.MODEL_ERROR
    status = 424


# Record-level errors the fault injector writes into output lines, by error code.
RECORD_ERRORS: dict[str, tuple[int, str]] = {
    ThrottlingException.code: (429, "Too many requests, please wait before trying again."),
    InternalServerException.code: (500, "The server encountered an internal error, try again."),
    ModelTimeoutException.code: (408, "Model has timed out in processing the request."),
    ServiceUnavailableException.code: (
        503,
        "The service is temporarily unable to handle requests.",
    ),
    ModelErrorException.code: (424, "The model returned an error while processing the request."),
}
