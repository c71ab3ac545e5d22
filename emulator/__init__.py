"""Local Amazon Bedrock batch inference: the control plane and job runner, beside moto."""

from .catalog import CATALOG, ModelSpec, base_model_id, lookup
from .config import EmulatorConfig
from .faults import Faults
from .models import TRANSITIONS, JobStatus
from .server import EmulatorServer
from .stack import ROLE_ARN, LocalStack

__all__ = [
    "CATALOG",
    "ROLE_ARN",
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
