"""tether: a durable runtime for AI agents."""

from tether.agent import Agent, HookContext
from tether.app import App, RunHandle
from tether.context import (
    AsyncRunContext,
    RunContext,
    RunScope,
    StepScope,
    current_run,
    current_step,
)
from tether.errors import (
    AlreadyExists,
    ConfigurationError,
    ConflictError,
    ControlSignal,
    DatabaseUnavailable,
    InvalidTransition,
    LeaseLost,
    NonDeterminismError,
    NotFound,
    Refused,
    RunFailed,
    SerializationError,
    StorageFull,
    TetherError,
)
from tether.interceptors import Interceptor, StepAttempt
from tether.lifecycle import LifecycleState
from tether.types import Checkpoint, Retention, Retry, RunStatus, Strategy

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AlreadyExists",
    "App",
    "AsyncRunContext",
    "Checkpoint",
    "ConfigurationError",
    "ConflictError",
    "ControlSignal",
    "DatabaseUnavailable",
    "HookContext",
    "Interceptor",
    "InvalidTransition",
    "LeaseLost",
    "LifecycleState",
    "NonDeterminismError",
    "NotFound",
    "Refused",
    "Retention",
    "Retry",
    "RunContext",
    "RunFailed",
    "RunHandle",
    "RunScope",
    "RunStatus",
    "SerializationError",
    "StepAttempt",
    "StepScope",
    "StorageFull",
    "Strategy",
    "TetherError",
    "__version__",
    "current_run",
    "current_step",
]
