"""What a model's batch jobs are doing, to tell a stalled model from a queued one.

The batch metrics show records pending with no tokens processed both when Bedrock works on a
job and gets nowhere (stalled) and when every job of the model is still waiting to start: a
batch job may stay Scheduled for hours while Bedrock finds capacity (botocore's bedrock
service model, ModelInvocationJobStatus; the user guide's "Monitor batch inference jobs").
Only the jobs' statuses tell the two apart.
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable

from tasks.aws.clients import client, error_code, job_summaries
from tasks.bedrock.model_ids import base_model_id
from tasks.bedrock.statuses import IN_PROGRESS, SCHEDULED, SUBMITTED, VALIDATING

logger = logging.getLogger(__name__)

# The statuses that tell the two apart: one job InProgress means Bedrock is working on the
# model; jobs only in these waiting ones mean it has not started any.
WAITING_STATUSES = (SUBMITTED, VALIDATING, SCHEDULED)
LOOKED_UP = (IN_PROGRESS, *WAITING_STATUSES)

JobCounts = Callable[[str], "dict[str, int] | None"]


def live_job_counts(model_id: str) -> dict[str, int] | None:
    """The model's jobs per status among InProgress and the waiting ones; None if unknown.

    One ListModelInvocationJobs paging per status (`statusEquals`), asked only while a stall
    is suspected. A refusal (no `bedrock:ListModelInvocationJobs`, throttling) leaves the
    alert as the metrics alone say, with the counts unknown.
    """
    wanted = base_model_id(model_id)
    counts: Counter[str] = Counter()
    bedrock = client("bedrock")
    try:
        for status in LOOKED_UP:
            for job in job_summaries(
                bedrock.list_model_invocation_jobs, statusEquals=status, maxResults=1000
            ):
                if base_model_id(job.get("modelId", "")) == wanted:
                    counts[job.get("status", status)] += 1
    except Exception as exc:  # noqa: BLE001 - any refusal means "unknown", never a lost alert
        logger.warning(
            "Could not list the batch jobs of %s (%s): the stalled rule goes by the metrics alone",
            model_id,
            error_code(exc) or type(exc).__name__,
        )
        return None
    return {status: counts[status] for status in LOOKED_UP}
