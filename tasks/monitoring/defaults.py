"""Names the monitoring commands default to, importable without Prefect (fast CLI start-up)."""

from __future__ import annotations

NOTIFICATION_BLOCK = "bedrock-batch-alerts"
SUMMARIZE_DEPLOYMENT = "summarize-run/summarize-run"
