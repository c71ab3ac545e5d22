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
"""

from __future__ import annotations

import functools
import time

_APPLIED = "_bedrock_batch_speedup"


def apply() -> list[str]:
    """Apply the speed-ups that fit the installed moto; return the names of those applied."""
    applied = []
    if _retention_check():
        applied.append("sqs-retention-check")
    if _sqs_clock():
        applied.append("sqs-clock")
    if _jsonpath_cache():
        applied.append("events-jsonpath-cache")
    if _sqs_batch_authorization():
        applied.append("sqs-batch-authorization")
    return applied


def _retention_check() -> bool:
    try:
        from moto.sqs.models import Queue, SQSBackend
    except ImportError:
        return False
    current = SQSBackend.is_message_valid_based_on_retention_period
    if getattr(current, _APPLIED, False):
        return True
    if "MessageRetentionPeriod" not in getattr(Queue, "BASE_ATTRIBUTES", ()):
        return False

    def retention_check(self, queue_name, message) -> bool:
        # The value get_queue_attributes(["MessageRetentionPeriod"]) returns: the queue's
        # attribute (an int since Queue._set_attributes).
        period = getattr(self.get_queue(queue_name), "message_retention_period", None)
        if period is None:  # another shape of Queue: moto's own way
            return current(self, queue_name, message)
        return int(period) + message.sent_timestamp / 1000 > time.time()

    setattr(retention_check, _APPLIED, True)
    SQSBackend.is_message_valid_based_on_retention_period = retention_check
    return True


def _sqs_clock() -> bool:
    try:
        import moto.sqs.models as sqs_models
    except ImportError:
        return False
    if getattr(sqs_models.unix_time, _APPLIED, False):
        return True
    slow_seconds = getattr(sqs_models, "unix_time", None)
    slow_millis = getattr(sqs_models, "unix_time_millis", None)
    if slow_seconds is None or slow_millis is None:
        return False

    # moto.core.utils.unix_time: (utcnow() - utcfromtimestamp(0)) in seconds, built from two
    # datetimes at each call; the same clock is time.time(). An explicit datetime still goes
    # to moto's own function.
    def unix_time(dt=None) -> float:
        return time.time() if dt is None else slow_seconds(dt)

    def unix_time_millis(dt=None) -> float:
        return time.time() * 1000.0 if dt is None else slow_millis(dt)

    for fast in (unix_time, unix_time_millis):
        setattr(fast, _APPLIED, True)
    sqs_models.unix_time = unix_time
    sqs_models.unix_time_millis = unix_time_millis
    return True


def _jsonpath_cache() -> bool:
    try:
        import jsonpath_ng.ext as jsonpath_ext
    except ImportError:
        return False
    if getattr(jsonpath_ext.parse, _APPLIED, False):
        return True
    # moto imports `parse` from jsonpath_ng.ext inside EventTemplateParser.parse, at each call,
    # so it finds this one. A parsed path is only read from (find), so sharing it is safe.
    cached = functools.lru_cache(maxsize=256)(jsonpath_ext.parse)
    setattr(cached, _APPLIED, True)
    jsonpath_ext.parse = cached
    return True


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
    original = IAMRequestBase.__init__
    if getattr(original, _APPLIED, False):
        return True

    @functools.wraps(original)
    def __init__(self, *args, **kwargs) -> None:
        original(self, *args, **kwargs)
        action = getattr(self, "_action", None)
        if action in SQS_BATCH_ACTIONS:
            self._action = SQS_BATCH_ACTIONS[action]

    setattr(__init__, _APPLIED, True)
    IAMRequestBase.__init__ = __init__
    return True
