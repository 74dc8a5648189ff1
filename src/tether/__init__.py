"""tether: a durable runtime for AI agents."""

from tether.agent import Agent, HookContext
from tether.app import App, RunHandle
from tether.approvals import Decision
from tether.context import (
    AsyncRunContext,
    RunContext,
    RunScope,
    StepScope,
    current_run,
    current_step,
)
from tether.coordination import ChildHandle, Ready, Receive
from tether.errors import (
    AlreadyExists,
    ChildCancelled,
    ChildRunFailed,
    ConfigurationError,
    ConflictError,
    ControlSignal,
    DatabaseUnavailable,
    InvalidInput,
    InvalidTransition,
    LeaseLost,
    NonDeterminismError,
    NotFound,
    Refused,
    RunFailed,
    SerializationError,
    StorageFull,
    TetherError,
    WaitTimeout,
)
from tether.interceptors import Interceptor, StepAttempt
from tether.lifecycle import LifecycleState
from tether.messaging import Message
from tether.types import (
    ApprovalInfo,
    Checkpoint,
    MessageInfo,
    Retention,
    Retry,
    RunStatus,
    Strategy,
)

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AlreadyExists",
    "App",
    "ApprovalInfo",
    "AsyncRunContext",
    "Checkpoint",
    "ChildCancelled",
    "ChildHandle",
    "ChildRunFailed",
    "ConfigurationError",
    "ConflictError",
    "ControlSignal",
    "DatabaseUnavailable",
    "Decision",
    "HookContext",
    "Interceptor",
    "InvalidInput",
    "InvalidTransition",
    "LeaseLost",
    "LifecycleState",
    "Message",
    "MessageInfo",
    "NonDeterminismError",
    "NotFound",
    "Ready",
    "Receive",
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
    "WaitTimeout",
    "__version__",
    "current_run",
    "current_step",
]
