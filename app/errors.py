"""The error tree. Library exceptions are translated at each layer's edge.

ServiceError
├── BrokerError    storage or live feed unreachable / refused (Redis, memory)
├── AuthError      missing, invalid or expired credentials; a token for another tenant
└── AdapterError   a field device or its protocol library failed
"""

from __future__ import annotations


class ServiceError(Exception):
    """Base of every error wellstream raises on purpose."""


class BrokerError(ServiceError):
    def __init__(self, action: str, detail: str) -> None:
        super().__init__(action, detail)
        self.action = action
        self.detail = detail

    def __str__(self) -> str:
        return f"broker failed to {self.action}: {self.detail}"


class AuthError(ServiceError):
    """`status` is the HTTP answer: 401 for bad credentials, 403 for a token of another tenant."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason, status)
        self.reason = reason
        self.status = status

    def __str__(self) -> str:
        return f"{self.status}: {self.reason}"


class AdapterError(ServiceError):
    def __init__(self, connection_id: str, detail: str) -> None:
        super().__init__(connection_id, detail)
        self.connection_id = connection_id
        self.detail = detail

    def __str__(self) -> str:
        return f"adapter {self.connection_id}: {self.detail}"
