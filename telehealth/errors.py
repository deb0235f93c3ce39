"""Domain errors with a stable code; telehealth.rpc maps each code to one gRPC status."""

from __future__ import annotations

from enum import Enum


class ErrorCode(Enum):
    INVALID_ARGUMENT = "invalid_argument"
    NOT_FOUND = "not_found"
    FAILED_PRECONDITION = "failed_precondition"
    RESOURCE_EXHAUSTED = "resource_exhausted"
    UNAVAILABLE = "unavailable"
    UNAUTHENTICATED = "unauthenticated"
    PERMISSION_DENIED = "permission_denied"
    ALREADY_EXISTS = "already_exists"
    OUT_OF_RANGE = "out_of_range"
    DEADLINE_EXCEEDED = "deadline_exceeded"


# The HTTP side (console, archive, edge pages) answers each code with one status.
HTTP_STATUS = {
    ErrorCode.INVALID_ARGUMENT: 400,
    ErrorCode.OUT_OF_RANGE: 400,
    ErrorCode.UNAUTHENTICATED: 401,
    ErrorCode.PERMISSION_DENIED: 403,
    ErrorCode.NOT_FOUND: 404,
    ErrorCode.ALREADY_EXISTS: 409,
    ErrorCode.FAILED_PRECONDITION: 409,
    ErrorCode.RESOURCE_EXHAUSTED: 429,
    ErrorCode.UNAVAILABLE: 503,
    ErrorCode.DEADLINE_EXCEEDED: 504,
}


class DomainError(Exception):
    """An expected failure with a message that says what was wrong and what is allowed."""

    code: ErrorCode = ErrorCode.INVALID_ARGUMENT

    def __init__(self, message: str, code: ErrorCode | None = None) -> None:
        super().__init__(message)
        if code is not None:
            self.code = code

    @property
    def message(self) -> str:
        return str(self.args[0])


class InvalidArgument(DomainError):
    code = ErrorCode.INVALID_ARGUMENT


class NotFound(DomainError):
    code = ErrorCode.NOT_FOUND


class FailedPrecondition(DomainError):
    code = ErrorCode.FAILED_PRECONDITION


class ResourceExhausted(DomainError):
    code = ErrorCode.RESOURCE_EXHAUSTED


class Unavailable(DomainError):
    code = ErrorCode.UNAVAILABLE


class Unauthenticated(DomainError):
    code = ErrorCode.UNAUTHENTICATED


class PermissionDenied(DomainError):
    code = ErrorCode.PERMISSION_DENIED


class DeadlineExceeded(DomainError):
    code = ErrorCode.DEADLINE_EXCEEDED


class AlreadyExists(DomainError):
    code = ErrorCode.ALREADY_EXISTS
