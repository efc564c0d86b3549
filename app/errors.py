"""The error tree: every error wellstream raises on purpose. Library exceptions are translated
at each layer's edge (`raise ... from exc`), so none of theirs crosses a seam.

ServiceError
├── BrokerError      storage or live feed unreachable / refused (Redis, memory)
├── AuthError        missing, invalid or expired credentials; a token for another tenant
├── LimitError       over an admission limit (429), or this gateway is full (503)
├── RequestError     a request the gateway refuses as asked (400, 404, 413)
├── AdapterError     a field device or its protocol library failed
│   ├── ConnectionLost   the device or broker stopped answering: the adapter reconnects
│   └── PayloadError     a message that cannot become a Reading: skipped and logged
├── SiteError        a site file that cannot be used
└── SpoolError       the ingest spool cannot be opened or written

HTTP answers are chosen along this tree (app/gateway/errors.py): a subclass is answered
like its nearest handled base, never as a 500.
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


class HTTPRefusal(ServiceError):
    """An error with an HTTP answer of its own: `status` and a `reason` safe to show the client."""

    def __init__(self, reason: str, status: int) -> None:
        super().__init__(reason, status)
        self.reason = reason
        self.status = status

    def __str__(self) -> str:
        return f"{self.status}: {self.reason}"


class AuthError(HTTPRefusal):
    """`status` is the HTTP answer: 401 for bad credentials, 403 for a token of another tenant."""

    def __init__(self, reason: str, status: int = 401) -> None:
        super().__init__(reason, status)


class LimitError(HTTPRefusal):
    """`status` 429 (this caller is over a limit) or 503 (this gateway is full: try another)."""

    def __init__(self, reason: str, status: int, retry_after_s: int) -> None:
        super().__init__(reason, status)
        self.retry_after_s = retry_after_s


class RequestError(HTTPRefusal):
    """A malformed or unanswerable request: 400, 404 (an invalid or unknown id) or 413."""


class AdapterError(ServiceError):
    def __init__(self, connection_id: str, detail: str) -> None:
        super().__init__(connection_id, detail)
        self.connection_id = connection_id
        self.detail = detail

    def __str__(self) -> str:
        return f"adapter {self.connection_id}: {self.detail}"


class ConnectionLost(AdapterError):
    """The device (or MQTT broker) stopped answering, or the connection dropped; the adapter reconnects."""


class PayloadError(AdapterError):
    """A message payload that cannot become a Reading; it is skipped and logged."""


class SiteError(ServiceError):
    """A site file that cannot be used; the message names the file, the connection and the problem."""


class SpoolError(ServiceError):
    """The spool cannot be opened (unwritable path, another worker owns it) or written (disk full)."""
