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
    BudgetExceeded,
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
    PolicyDenied,
    Refused,
    RunFailed,
    SerializationError,
    StorageFull,
    TetherError,
    WaitTimeout,
)
from tether.interceptors import Interceptor, StepAttempt
from tether.lifecycle import LifecycleState
from tether.limits import Budget, Policy
from tether.messaging import Message
from tether.types import (
    ApprovalInfo,
    Checkpoint,
    LimitInfo,
    MessageInfo,
    Retention,
    Retry,
    RunStatus,
    RunUsage,
    Strategy,
    Usage,
)

__version__ = "0.1.0"

__all__ = [
    "Agent",
    "AlreadyExists",
    "App",
    "ApprovalInfo",
    "AsyncRunContext",
    "Budget",
    "BudgetExceeded",
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
    "LimitInfo",
    "Message",
    "MessageInfo",
    "NonDeterminismError",
    "NotFound",
    "Policy",
    "PolicyDenied",
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
    "RunUsage",
    "SerializationError",
    "StepAttempt",
    "StepScope",
    "StorageFull",
    "Strategy",
    "TetherError",
    "Usage",
    "WaitTimeout",
    "__version__",
    "current_run",
    "current_step",
]
