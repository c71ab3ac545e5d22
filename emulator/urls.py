"""Route table: REST paths of bedrock and bedrock-runtime, plus the /_emulator admin API."""

from __future__ import annotations

from werkzeug.routing import Map, Rule

url_map = Map(
    [
        Rule("/model-invocation-job", methods=["POST"], endpoint="create_model_invocation_job"),
        Rule(
            "/model-invocation-job/<path:job_identifier>/stop",
            methods=["POST"],
            endpoint="stop_model_invocation_job",
        ),
        Rule(
            "/model-invocation-job/<path:job_identifier>",
            methods=["GET"],
            endpoint="get_model_invocation_job",
        ),
        Rule("/model-invocation-jobs", methods=["GET"], endpoint="list_model_invocation_jobs"),
        Rule("/model/<path:model_id>/invoke", methods=["POST"], endpoint="invoke_model"),
        Rule("/model/<path:model_id>/converse", methods=["POST"], endpoint="converse"),
        Rule("/model/<path:model_id>/count-tokens", methods=["POST"], endpoint="count_tokens"),
        Rule("/_emulator/ledger", methods=["GET"], endpoint="admin_ledger"),
        Rule("/_emulator/calls", methods=["GET"], endpoint="admin_calls"),
        Rule("/_emulator/calls", methods=["DELETE"], endpoint="admin_calls_reset"),
        Rule("/_emulator/config", methods=["GET"], endpoint="admin_state"),
        Rule("/_emulator/config", methods=["POST"], endpoint="admin_config"),
        Rule("/_emulator/faults", methods=["POST"], endpoint="admin_faults"),
        Rule("/_emulator/reset", methods=["POST"], endpoint="admin_reset"),
        Rule("/_emulator/health", methods=["GET"], endpoint="admin_health"),
    ],
    strict_slashes=False,
)
