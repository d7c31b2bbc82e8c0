"""The model service's failures, each mapped to one gRPC status for the guest.

All are `NeuraError`s so the CLI prints them as one line and a hint; `code` is the status a
guest sees, so the servicer never has to guess which failure was the caller's fault.
"""

from __future__ import annotations

import grpc

from hypervisor.errors import NeuraError


class InferenceError(NeuraError):
    code = grpc.StatusCode.INTERNAL
    hint = "see the controller's log for the model service"


class BackendUnavailable(InferenceError):
    code = grpc.StatusCode.UNAVAILABLE
    hint = "install the backend's packages (see `neuraos models`), or pick another backend"


class InvalidRequest(InferenceError):
    code = grpc.StatusCode.INVALID_ARGUMENT
    hint = "fix the request; nothing was run"


class QuotaExceeded(InferenceError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED
    hint = "wait and retry, or raise the guest's model quota"


class SessionNotFound(InferenceError):
    code = grpc.StatusCode.NOT_FOUND
    hint = "start the session without resume, or list this guest's sessions"


class SessionBusy(InferenceError):
    code = grpc.StatusCode.ABORTED
    hint = "wait for the session's running completion to finish"
