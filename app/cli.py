"""`wellstream` (= `python -m app`): demo, serve, token."""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import secrets
import signal
import sys
import time
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydantic import SecretStr, ValidationError

from app import logs
from app.adapters.simulator import SimulatorAdapter
from app.auth.revocation import subject_hash
from app.auth.tokens import mint_token
from app.errors import ServiceError, SiteError, SpoolError
from app.gateway import devcert, server, workers
from app.gateway.app import build_verifier, create_app
from app.ingest.publisher import Publisher
from app.ingest.sitefile import Site, load_site
from app.ingest.worker import run_ingest
from app.models import is_valid_id
from app.settings import Settings, environment
from app.streams.connect import open_broker
from app.streams.seams import Broker, Revocation

DEMO_TENANTS = ("acme", "globex")
DEMO_WELLS = tuple(f"well-{n:02d}" for n in range(1, 6))


def _run(main: Coroutine[Any, Any, None]) -> None:
    try:
        import uvloop

        uvloop.run(main)
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        asyncio.run(main)


def _settings(**overrides: Any) -> Settings:
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        sys.exit(f"wellstream: bad configuration:\n{exc}")


def _ids(value: str) -> list[str]:
    ids = [part.strip() for part in value.split(",") if part.strip()]
    bad = [part for part in ids if not is_valid_id(part)]
    if bad:
        raise argparse.ArgumentTypeError(f"not valid ids: {', '.join(bad)}")
    return ids


def _positive(value: str) -> int:
    number = int(value)
    if number <= 0:
        raise argparse.ArgumentTypeError("must be a positive number of seconds")
    return number


def _id(value: str) -> str:
    if not is_valid_id(value):
        raise argparse.ArgumentTypeError(f"not a valid id: {value!r}")
    return value


def cmd_token(args: argparse.Namespace) -> None:
    secret = _settings().secret
    if not secret:
        sys.exit("wellstream: set WELLSTREAM_JWT_SECRET to mint tokens")
    print(mint_token(secret, args.tenant, args.subject, args.wells, args.ttl))


def cmd_serve(args: argparse.Namespace) -> None:
    settings = _settings()
    worker = args.worker_index
    logs.configure(args.log_level, {"worker": worker} if worker is not None else None)
    _require_server(args.server)
    toml = args.hypercorn_config
    if toml is not None and (args.server != "hypercorn" or not toml.is_file()):
        sys.exit(f"wellstream: --hypercorn-config needs --server hypercorn and an existing file: {toml}")
    if args.workers > 1:
        options = workers.ServeOptions(args.host, args.port, args.server, args.log_level, toml, args.metrics_port)
        try:
            build_verifier(settings)  # the key check create_app makes: the supervisor serves no app itself
            workers.preflight(settings, options)
        except ValueError as exc:
            sys.exit(f"wellstream: cannot serve: {exc}")
        sys.exit(workers.supervise(settings, options, args.workers))
    try:
        # Any one key source is enough (a public key needs no secret); a missing or unusable one,
        # or a public key without an audience, stops here with the reason.
        app = create_app(settings)
    except ValueError as exc:
        sys.exit(f"wellstream: cannot serve: {exc}")
    if args.supervisor_pid is not None and not workers.die_with(args.supervisor_pid):
        sys.exit("wellstream: the supervisor of this worker is gone")
    reuse_port = worker is not None
    _run(
        server.run(
            app,
            settings,
            args.host,
            args.port,
            args.server,
            toml,
            reuse_port=reuse_port,
            metrics_port=args.metrics_port,
        )
    )


def _workers(value: str) -> int:
    try:
        return workers.worker_count(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r}: a number of processes (1 or more), or auto") from None


def cmd_revoke(args: argparse.Namespace) -> None:
    settings = _settings()
    if not settings.redis_url:
        sys.exit("wellstream: revoke writes to the gateways' Redis: set WELLSTREAM_REDIS_URL")
    if args.jti:
        revocation = Revocation("token", args.tenant, args.jti)
        what = f"token {args.jti!r} of tenant {args.tenant}"
    else:
        before = time.time() if args.before is None else args.before
        revocation = Revocation("subject", args.tenant, subject_hash(args.subject), before)
        when = datetime.fromtimestamp(before, UTC).isoformat(timespec="seconds")
        what = f"tokens of {args.subject!r} (tenant {args.tenant}) issued before {when}"

    async def revoke() -> None:
        async with open_broker(settings) as broker:
            await broker.revocations.revoke(revocation, args.keep)

    try:
        _run(revoke())
    except ServiceError as exc:
        sys.exit(f"wellstream: could not revoke: {exc}")
    print(f"revoked {what}; remembered for {args.keep:g} s; live streams end within seconds")


def _moment(text: str) -> float | None:
    """--before: None for now (read when the command runs), else epoch seconds."""
    if text == "now":
        return None
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'now' or an ISO-8601 time") from None
    if moment.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone: add Z or an offset")
    return moment.timestamp()


def cmd_dev_cert(args: argparse.Namespace) -> None:
    files = devcert.write_dev_cert(args.dir, args.name)
    print(f"CA (trust this one): {files.ca}\nserver certificate: {files.cert}\nserver key: {files.key}")


def _require_server(name: str) -> None:
    if name != "hypercorn" and importlib.util.find_spec(name) is None:
        sys.exit(f"wellstream: --server {name} needs the {name} extra: pip install 'wellstream[{name}]'")


def simulate(wells: list[tuple[str, str]], interval_s: float) -> Callable[[Broker], Coroutine[Any, Any, None]]:
    async def job(broker: Broker) -> None:
        async with Publisher(broker.log) as publisher:
            await SimulatorAdapter(wells, interval_s).run(publisher)

    return job


def cmd_demo(args: argparse.Namespace) -> None:
    settings = _settings()
    secret = settings.secret or secrets.token_urlsafe(32)
    registry = {tenant: list(DEMO_WELLS) for tenant in DEMO_TENANTS}
    settings = settings.model_copy(update={"jwt_secret": SecretStr(secret), "wells": registry})
    logs.configure(args.log_level)
    _require_server(args.server)
    wells = [(tenant, well) for tenant in DEMO_TENANTS for well in DEMO_WELLS]
    base = f"http://{args.host}:{args.port}"
    acme = mint_token(secret, "acme", "demo", ttl_s=12 * 3600)
    globex = mint_token(secret, "globex", "demo", ttl_s=12 * 3600)
    banner = (
        f"wellstream demo ({'redis' if settings.redis_url else 'memory'} broker)\n"
        f"  dashboard: {base}/#token={acme}\n"
        f"  token (acme):   {acme}\n"
        f"  token (globex): {globex}\n"
        f'  try: curl -N -H "Authorization: Bearer {acme}" {base}/tenants/acme/wells/well-01/stream\n'
    )
    jobs = [simulate(wells, args.interval), announce(banner, args.host, args.port)]
    _run(server.run(create_app(settings, background=jobs), settings, args.host, args.port, args.server))


def announce(text: str, host: str, port: int) -> Callable[[Broker], Coroutine[Any, Any, None]]:
    """Print `text` once the server accepts connections, so what it says to try works at once."""

    async def job(broker: Broker) -> None:
        for _ in range(600):
            try:
                _, writer = await asyncio.open_connection(host, port)
            except OSError:
                await asyncio.sleep(0.05)
                continue
            writer.close()
            break
        print(text, flush=True)

    return job


def cmd_check_config(args: argparse.Namespace) -> None:
    try:
        site = load_site(args.file)
    except SiteError as exc:
        sys.exit(f"wellstream: {exc}")
    wells = sum(len(tenant.wells) for tenant in site.tenants.values())
    print(f"{args.file}: ok: {len(site.tenants)} tenants, {wells} wells, {len(site.connections)} connections")


def cmd_ingest(args: argparse.Namespace) -> None:
    settings = _settings()
    try:
        site = load_site(args.config)
    except SiteError as exc:
        sys.exit(f"wellstream: {exc}")
    if not settings.redis_url:
        sys.exit("wellstream: ingest publishes into Redis: set WELLSTREAM_REDIS_URL")
    logs.configure(args.log_level)
    _run(_ingest(site, settings, args))


async def _ingest(site: Site, settings: Settings, args: argparse.Namespace) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    async with open_broker(settings) as broker:  # Redis: cmd_ingest checked the URL is set
        try:
            metrics = (args.metrics_host, args.metrics_port) if args.metrics_port else None
            await run_ingest(site, broker, stop, environment(), spool=settings.spool, metrics=metrics)
        except SpoolError as exc:
            sys.exit(f"wellstream: {exc}")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="wellstream", description="Live SCADA telemetry over Server-Sent Events")
    commands = root.add_subparsers(dest="command", required=True)
    for name, func, help_text in (
        ("demo", cmd_demo, "gateway + simulator in one process, dashboard at /"),
        ("serve", cmd_serve, "gateway only (Hypercorn: HTTP/1.1, h2c; h2 over TLS with --hypercorn-config)"),
    ):
        sub = commands.add_parser(name, help=help_text)
        sub.add_argument("--host", default="127.0.0.1")
        sub.add_argument("--port", type=int, default=8000)
        sub.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        sub.add_argument(
            "--server", default="hypercorn", choices=server.SERVERS, help="ASGI server (uvicorn, granian: extras)"
        )
        sub.set_defaults(func=func)
        if name == "demo":
            sub.add_argument("--interval", type=float, default=1.0, help="seconds between samples of each tag")
        else:
            sub.add_argument(
                "--hypercorn-config",
                type=Path,
                default=None,
                help="Hypercorn TOML (config/hypercorn.toml: h2 over TLS, h1/h2c); its binds replace --host/--port",
            )
            sub.add_argument(
                "--workers",
                type=_workers,
                default=1,
                help="gateway processes sharing the port (SO_REUSEPORT), each with its own hub; auto: one per core",
            )
            sub.add_argument(
                "--metrics-port",
                type=int,
                default=0,
                help="also serve /metrics alone on this port of --host; worker i of --workers on this + i (0: off)",
            )
            # Set by the supervisor of --workers for each worker it starts; not for people.
            sub.add_argument("--worker-index", type=int, default=None, help=argparse.SUPPRESS)
            sub.add_argument("--supervisor-pid", type=int, default=None, help=argparse.SUPPRESS)
    dev_cert = commands.add_parser("dev-cert", help="make a local CA and a server certificate for TLS/HTTP/2")
    dev_cert.add_argument("--dir", type=Path, default=Path("certs"), help="where ca.pem, server.pem, server.key go")
    dev_cert.add_argument(
        "--name",
        action="append",
        default=None,
        help="DNS name or IP the certificate is for (repeatable; default: " + ", ".join(devcert.DEFAULT_NAMES) + ")",
    )
    dev_cert.set_defaults(func=cmd_dev_cert)
    check = commands.add_parser("check-config", help="validate a site file")
    check.add_argument("file", type=Path)
    check.set_defaults(func=cmd_check_config)
    ingest = commands.add_parser("ingest", help="read the site file's connections and publish into Redis")
    ingest.add_argument("--config", type=Path, default=Path("config/site.toml"))
    ingest.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    ingest.add_argument("--metrics-port", type=int, default=0, help="serve Prometheus /metrics on this port (0: off)")
    ingest.add_argument("--metrics-host", default="127.0.0.1")
    ingest.set_defaults(func=cmd_ingest)
    revoke = commands.add_parser(
        "revoke", help="revoke a token by jti, or a subject's tokens issued before a time (WELLSTREAM_REDIS_URL)"
    )
    revoke.add_argument("--tenant", required=True, type=_id)
    which = revoke.add_mutually_exclusive_group(required=True)
    which.add_argument("--jti", help="the token's jti claim")
    which.add_argument("--subject", help="the tokens' sub claim")
    revoke.add_argument(
        "--before", type=_moment, default=None, help="with --subject: 'now' (default) or an ISO-8601 time with a zone"
    )
    revoke.add_argument(
        "--keep", type=_positive, default=7 * 86400, help="seconds to remember it: at least your tokens' longest life"
    )
    revoke.set_defaults(func=cmd_revoke)
    token = commands.add_parser("token", help="mint a development token (HS256, WELLSTREAM_JWT_SECRET)")
    token.add_argument("--tenant", required=True, type=_id)
    token.add_argument("--wells", type=_ids, default=None, help="comma-separated allow-list")
    token.add_argument("--ttl", type=_positive, default=3600, help="seconds")
    token.add_argument("--subject", default="dev", help="the token's sub claim")
    token.set_defaults(func=cmd_token)
    return root


def main(argv: list[str] | None = None) -> None:
    args = parser().parse_args(argv)
    args.func(args)
