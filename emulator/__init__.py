"""Local Amazon Bedrock batch inference: the control plane and job runner, beside moto."""

from .catalog import CATALOG, ModelSpec, base_model_id, lookup
from .config import EmulatorConfig
from .faults import Faults
from .server import EmulatorServer
from .stack import ROLE_ARN, LocalStack
from .statuses import STOPPABLE, TRANSITIONS, JobStatus

__all__ = [
    "CATALOG",
    "ROLE_ARN",
    "STOPPABLE",
    "TRANSITIONS",
    "EmulatorConfig",
    "EmulatorServer",
    "Faults",
    "JobStatus",
    "LocalStack",
    "ModelSpec",
    "base_model_id",
    "lookup",
]
