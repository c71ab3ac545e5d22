"""Where moto's SQS and EventBridge differ from AWS, or are too slow to stand in for it.

Applied to the process that runs moto (in-process or its own, ``LocalStack``), each only where
moto still has the shape it was written against (moto 5.1-5.2); otherwise moto is left as is.

Authorization: moto's IAM enforcement asks for ``sqs:DeleteMessageBatch`` (and the other batch
actions) where AWS authorizes the single action (``SQS_BATCH_ACTIONS``).

Speed, without changing what moto answers. With job events on, moto carries Bedrock's state
change events: EventBridge PutEvents to an SQS target, then the relay's ReceiveMessage and
DeleteMessageBatch. At 400 jobs through a gate of 100, moto's own work made the events path
slower than polling (a job's end seen 31-34 s late, moto's process at ~100% of a core):

- ``SQSBackend.receive_message`` checks each message it returns against the queue's retention
  period through ``get_queue_attributes``, which computes every attribute of the queue, the
  approximate message counts among them, each a walk over all its messages: a receive of ten
  walked the queue twenty times or more, so a backlog made every receive slower still. The
  check now reads the one attribute it needs.
- moto's SQS reads the clock through ``unix_time``, two datetimes built at each call, for each
  message of each walk (``Message.visible``, ``delayed``); here it is ``time.time()``.
- ``EventTemplateParser.parse`` builds a fresh ``jsonpath_ng`` parser (PLY's yacc tables) for
  each of the eight paths of its default input template, for every event and target; each
  path is now parsed once.
- A ranged S3 GetObject read the whole object and then sliced it. boto3's managed download
  (``download_file``, the project's for objects of 8 MB and more) asks for a large object in
  8 MB ranges, so a 646 MB Titan v2 job output took 30 s to download (81 reads of all of it)
  against 0.65 s in one GET. A single byte range is now read alone; everything else (the
  range's parsing, 206 / 416, the headers) is still moto's.
"""

from __future__ import annotations

import functools
import re
import time
from collections.abc import Callable
from typing import Any

_APPLIED = "_bedrock_batch_moto_fix"


def apply() -> list[str]:
    """Apply the fixes that fit the installed moto; return the names of those applied."""
    fixes = {
        "sqs-retention-check": _retention_check,
        "sqs-clock": _sqs_clock,
        "events-jsonpath-cache": _jsonpath_cache,
        "sqs-batch-authorization": _sqs_batch_authorization,
        "s3-ranged-get": _s3_ranged_get,
    }
    return [name for name, fix in fixes.items() if fix()]


def _replace(owner: Any, name: str, make: Callable[[Any], Any]) -> bool:
    """Put ``make(current)`` in place of ``owner.name``, once; False when moto has no such name."""
    current = getattr(owner, name, None)
    if current is None:
        return False
    if not getattr(current, _APPLIED, False):
        replacement = make(current)
        setattr(replacement, _APPLIED, True)
        setattr(owner, name, replacement)
    return True


def _retention_check() -> bool:
    try:
        from moto.sqs.models import Queue, SQSBackend
    except ImportError:
        return False
    if "MessageRetentionPeriod" not in getattr(Queue, "BASE_ATTRIBUTES", ()):
        return False

    def make(moto_check):
        def retention_check(self, queue_name, message) -> bool:
            # The value get_queue_attributes(["MessageRetentionPeriod"]) returns: the queue's
            # attribute (an int since Queue._set_attributes).
            period = getattr(self.get_queue(queue_name), "message_retention_period", None)
            if period is None:  # another shape of Queue: moto's own way
                return moto_check(self, queue_name, message)
            return int(period) + message.sent_timestamp / 1000 > time.time()

        return retention_check

    return _replace(SQSBackend, "is_message_valid_based_on_retention_period", make)


def _sqs_clock() -> bool:
    # moto.core.utils.unix_time: (utcnow() - utcfromtimestamp(0)) in seconds, built from two
    # datetimes at each call; the same clock is time.time(). An explicit datetime still goes
    # to moto's own function.
    try:
        import moto.sqs.models as sqs_models
    except ImportError:
        return False

    def seconds(moto_clock):
        return lambda dt=None: time.time() if dt is None else moto_clock(dt)

    def millis(moto_clock):
        return lambda dt=None: time.time() * 1000.0 if dt is None else moto_clock(dt)

    return _replace(sqs_models, "unix_time", seconds) and _replace(
        sqs_models, "unix_time_millis", millis
    )


def _jsonpath_cache() -> bool:
    # moto imports `parse` from jsonpath_ng.ext inside EventTemplateParser.parse, at each call,
    # so it finds this one. A parsed path is only read from (find), so sharing it is safe.
    try:
        import jsonpath_ng.ext as jsonpath_ext
    except ImportError:
        return False
    return _replace(jsonpath_ext, "parse", functools.lru_cache(maxsize=256))


# SQS developer guide, sqs-batch-api.html, "Permissions": "You cannot set permissions explicitly
# for SendMessageBatch, DeleteMessageBatch, or ChangeMessageVisibilityBatch. Instead, setting
# permissions for SendMessage, DeleteMessage, or ChangeMessageVisibility sets permissions for
# the corresponding batch versions of the actions." moto's IAM enforcement asks for the batch
# names themselves, which no policy written for AWS grants.
SQS_BATCH_ACTIONS = {
    "sqs:SendMessageBatch": "sqs:SendMessage",
    "sqs:DeleteMessageBatch": "sqs:DeleteMessage",
    "sqs:ChangeMessageVisibilityBatch": "sqs:ChangeMessageVisibility",
}


def _sqs_batch_authorization() -> bool:
    try:
        from moto.iam.access_control import IAMRequestBase
    except ImportError:
        return False

    def make(moto_init):
        @functools.wraps(moto_init)
        def __init__(self, *args, **kwargs) -> None:
            moto_init(self, *args, **kwargs)
            action = getattr(self, "_action", None)
            if action in SQS_BATCH_ACTIONS:
                self._action = SQS_BATCH_ACTIONS[action]

        return __init__

    return _replace(IAMRequestBase, "__init__", make)


# One byte range (RFC 9110 "bytes=first-last", "bytes=first-", "bytes=-suffix"); a list of
# ranges, which S3 does not serve as ranges, stays moto's.
_SINGLE_RANGE = re.compile(r"bytes=(\d+-\d*|-\d+)")


class _KeyBytes:
    """An S3 key's value that reads only the bytes a slice of it asks for."""

    def __init__(self, key: Any) -> None:
        self._key = key

    def __len__(self) -> int:
        return self._key.size

    def __getitem__(self, part: slice) -> bytes:
        start, stop, _ = part.indices(len(self))
        with self._key.lock:
            self._key._value_buffer.seek(start)
            return self._key._value_buffer.read(max(0, stop - start))

    def __bytes__(self) -> bytes:
        return self[:]


class _RangedKey:
    """A FakeKey whose ``value`` is a `_KeyBytes`; everything else is the key's own."""

    def __init__(self, key: Any) -> None:
        self._key = key

    def __getattr__(self, name: str) -> Any:
        return getattr(self._key, name)

    @property
    def value(self) -> _KeyBytes:
        return _KeyBytes(self._key)


def _s3_ranged_get() -> bool:
    # S3Response.key_response handles a GET: get_object returns key.value (all of the object,
    # read from its spooled file) and _handle_range_header slices the range out of it. For a
    # single range the key _get_key hands to get_object reads only that slice. moto makes an
    # S3Response per request (key_dispatch), so the instance's _get_key is this request's.
    try:
        from moto.s3.models import FakeKey
        from moto.s3.responses import S3Response
    except ImportError:
        return False
    if not all(hasattr(S3Response, n) for n in ("_get_key", "get_object", "_handle_range_header")):
        return False
    if not isinstance(getattr(FakeKey, "size", None), property):
        return False

    def make(moto_key_response):
        @functools.wraps(moto_key_response)
        def key_response(self, request, full_url, headers):
            asked = request.headers.get("range") or ""
            if request.method != "GET" or not _SINGLE_RANGE.fullmatch(asked.strip()):
                return moto_key_response(self, request, full_url, headers)
            moto_get_key = self._get_key

            def get_key(*args, **kwargs):
                key, not_modified = moto_get_key(*args, **kwargs)
                has_buffer = hasattr(key, "_value_buffer") and hasattr(key, "lock")
                return (_RangedKey(key) if has_buffer else key), not_modified

            self._get_key = get_key
            status, response_headers, body = moto_key_response(self, request, full_url, headers)
            if isinstance(body, _KeyBytes):  # served whole after all (a range past the end)
                body = bytes(body)
            return status, response_headers, body

        return key_response

    return _replace(S3Response, "key_response", make)
