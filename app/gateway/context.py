"""What every request handler needs, built once per process by the app's lifespan."""

from __future__ import annotations

from dataclasses import dataclass

from starlette.requests import Request

from app.auth.admission import StreamLimits
from app.auth.guard import Guard, client_address
from app.auth.revocation import RevocationWatcher
from app.gateway.hub import Hub
from app.gateway.leasesweep import LeaseSweeper
from app.settings import Settings
from app.streams.seams import Broker


@dataclass(frozen=True, slots=True)
class Gateway:
    settings: Settings
    broker: Broker
    hub: Hub
    guard: Guard
    limits: StreamLimits
    sweeper: LeaseSweeper
    revocations: RevocationWatcher


def gateway_of(request: Request) -> Gateway:
    """The running gateway of the app serving `request` (app.gateway.app.GatewayApp sets it at start-up)."""
    gateway: Gateway | None = request.app.gateway
    if gateway is None:
        raise RuntimeError("a request arrived before the gateway's lifespan started")
    return gateway


def client_of(request: Request) -> str:
    """The client's address, believing X-Forwarded-For only from the configured trusted proxies."""
    return client_address(request, gateway_of(request).settings.auth.trusted_proxies)
