"""The layering of docs/design.md, checked on the source of every module under app/ with `ast`.

- the two processes stay apart: app/gateway/ never imports app/ingest/ or app/adapters/, and
  app/ingest/ never imports app/gateway/ or app/auth/; only app/cli.py (the entry point) sees both;
- consumers depend on the seams (app/streams/seams.py), never on an implementation: only
  app/streams/connect.py picks the memory or Redis broker;
- app/streams/ and app/auth/ know nothing of the gateway (no SSE encoder, no hub);
- each third-party library stays in its layer (`redis` in app/streams/redis/, `joserfc` in
  app/auth/, each field protocol library in its own adapter file, the web stack in the gateway);
- the shared vocabulary (models, errors, settings, logs, backoff, cancellation) imports nothing else of ours;
- app/alarms/ (a point's limits, the pure alarm state machine) is vocabulary for adapters, ingest and
  the gateway: it imports only app/models, so never Redis, the gateway or the ingest worker;
- nothing but app/settings.py reads `os.environ`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

APP = Path(__file__).resolve().parent.parent / "app"
MODULES = sorted(APP.rglob("*.py"))

# third-party top-level package -> the only app/ files (relative, POSIX) or folders (ending in /) that may import it
CONFINED = {
    "redis": ("streams/redis/",),
    "joserfc": ("auth/",),
    "asyncua": ("adapters/opcua.py",),
    "pymodbus": ("adapters/modbus.py",),
    "aiomqtt": ("adapters/mqtt.py", "adapters/sparkplug.py"),
    "google": ("adapters/sparkplug_payload.py", "adapters/sparkplug_b_pb2.py"),
    "hypercorn": ("gateway/server.py", "gateway/sockets.py"),
    "uvicorn": ("gateway/server.py", "gateway/sockets.py"),
    "granian": ("gateway/server.py",),
    "starlette": ("gateway/", "auth/guard.py", "auth/crosssite.py"),
    "prometheus_client": ("gateway/metrics.py", "gateway/app.py", "ingest/metrics.py"),
    "cryptography": ("gateway/devcert.py", "auth/"),
}
VOCABULARY = ("app.models", "app.errors", "app.settings", "app.logs", "app.backoff", "app.cancellation")
# folder (or file) -> the app modules it may import, besides its own folder
MAY_IMPORT = {
    "adapters/": ("app.models", "app.errors", "app.backoff", "app.cancellation", "app.alarms.limits", "app.adapters"),
    # the alarm vocabulary: limits (a point's `alarms`) and the pure state machine; no Redis, no process
    "alarms/": ("app.models", "app.alarms"),
    "streams/": (*VOCABULARY, "app.streams"),
    "auth/": (*VOCABULARY, "app.streams.seams", "app.auth"),
    "ingest/": (*VOCABULARY, "app.streams.seams", "app.adapters", "app.alarms", "app.ingest"),
    "gateway/": (
        *VOCABULARY,
        "app.streams.seams",
        "app.streams.codec",
        "app.streams.connect",
        "app.auth",
        "app.alarms",
        "app.gateway",
    ),
    "models.py": (),
    "errors.py": (),
    "logs.py": (),
    "backoff.py": (),
    "cancellation.py": (),
    "settings.py": ("app.models",),
}


def rel(path: Path) -> str:
    return path.relative_to(APP).as_posix()


def module_name(path: Path) -> str:
    parts = ("app", *path.relative_to(APP).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def imports_in(tree: ast.Module, package: str) -> set[str]:
    """Every module a tree imports, absolute (relative ones resolved against `package`), with
    `from x import y` as both `x` and `x.y`; imports inside functions and `if TYPE_CHECKING:` count."""
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, node.module] if node.module else anchor)
            else:
                base = node.module or ""
            found.add(base)
            found.update(f"{base}.{alias.name}" for alias in node.names if alias.name != "*")
    return found


def imported_modules(path: Path) -> set[str]:
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    return imports_in(parse(path), package)


def top_levels(path: Path) -> set[str]:
    return {name.partition(".")[0] for name in imported_modules(path)}


def app_imports(path: Path) -> set[str]:
    """The `app` modules (or names from them) that `path` imports."""
    return {name for name in imported_modules(path) if name == "app" or name.startswith("app.")}


def reads_environ(path: Path) -> list[int]:
    """Line numbers where `os.environ` or a bare `environ` (from os import environ) is used,
    plus `os.getenv`/`getenv` calls, which read the same thing."""
    lines = []
    for node in ast.walk(parse(path)):
        if isinstance(node, ast.Attribute) and node.attr in {"environ", "getenv", "environb", "getenvb"}:
            lines.append(node.lineno)
        elif isinstance(node, ast.Name) and node.id in {"environ", "getenv", "environb", "getenvb"}:
            lines.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "os":
            if any(alias.name in {"environ", "getenv", "environb", "getenvb"} for alias in node.names):
                lines.append(node.lineno)
    return lines


def test_app_has_modules_to_check() -> None:
    names = {rel(path) for path in MODULES}

    assert {"models.py", "settings.py", "streams/redis/log.py", "auth/tokens.py", "adapters/simulator.py"} <= names


def test_helper_finds_redis_in_the_redis_broker() -> None:
    found = imported_modules(APP / "streams" / "redis" / "client.py")

    assert "redis" in top_levels(APP / "streams" / "redis" / "client.py")
    assert "redis.asyncio" in found
    assert "app.errors.BrokerError" in found


def test_helper_finds_joserfc_and_app_imports_in_tokens() -> None:
    assert "joserfc" in top_levels(APP / "auth" / "tokens.py")
    assert "app.models" in app_imports(APP / "auth" / "tokens.py")


def test_helper_resolves_relative_imports() -> None:
    source = "from . import base\nfrom ..streams import redis\nfrom .. import settings\nimport redis as r\n"

    found = imports_in(ast.parse(source), "app.adapters")

    assert {"app.adapters.base", "app.streams.redis", "app.settings", "redis"} <= found
    assert module_name(APP / "adapters" / "simulator.py") == "app.adapters.simulator"
    assert module_name(APP / "adapters" / "__init__.py") == "app.adapters"


def test_helper_finds_every_way_of_reading_the_environment(tmp_path: Path) -> None:
    for source in ("import os\nos.environ['X']", "from os import environ\n", "import os\nos.getenv('X')"):
        module = tmp_path / "probe.py"
        module.write_text(source, encoding="utf-8")
        assert reads_environ(module), source
    module.write_text("import os\nos.path.join('a')\n", encoding="utf-8")
    assert reads_environ(module) == []


def test_helper_finds_environ_reads_in_settings() -> None:
    assert reads_environ(APP / "settings.py")


@pytest.mark.parametrize("library", sorted(CONFINED))
def test_third_party_libraries_stay_in_their_layer(library: str) -> None:
    allowed = CONFINED[library]
    offenders = [
        rel(path)
        for path in MODULES
        if library in top_levels(path)
        and not any(rel(path).startswith(place) if place.endswith("/") else rel(path) == place for place in allowed)
    ]

    assert offenders == [], f"{library} may only be imported in {', '.join(allowed)}"


def allowed(name: str, prefixes: tuple[str, ...]) -> bool:
    return any(name == prefix or name.startswith(prefix + ".") for prefix in prefixes)


def layer_of(path: Path) -> str | None:
    relative = rel(path)
    return next((layer for layer in MAY_IMPORT if relative == layer or relative.startswith(layer)), None)


@pytest.mark.parametrize("path", MODULES, ids=rel)
def test_each_layer_imports_only_what_it_may(path: Path) -> None:
    layer = layer_of(path)
    if layer is None:
        assert rel(path) in {"__init__.py", "__main__.py", "cli.py"}, f"{rel(path)} belongs to no layer"
        return
    # `from app import models` records both `app` and `app.models`; the second is what is judged
    offenders = sorted(name for name in app_imports(path) - {"app"} if not allowed(name, MAY_IMPORT[layer]))

    assert offenders == [], f"{rel(path)} ({layer}) may import only {', '.join(MAY_IMPORT[layer]) or 'nothing of ours'}"


def test_only_connect_picks_a_broker_implementation() -> None:
    implementations = ("app.streams.memory", "app.streams.redis")
    offenders = sorted(
        rel(path)
        for path in MODULES
        if not rel(path).startswith(("streams/memory", "streams/redis"))
        and rel(path) != "streams/connect.py"
        and any(allowed(name, implementations) for name in app_imports(path))
    )

    assert offenders == [], "depend on app/streams/seams.py; app/streams/connect.py chooses the implementation"


def test_the_layer_rules_catch_a_forbidden_import(tmp_path: Path) -> None:
    probe = APP / "streams" / "probe_layers.py"
    tree = ast.parse("from app.gateway.sse import reading_frame\n")
    found = {name for name in imports_in(tree, "app.streams") if name.startswith("app.")}

    assert not all(allowed(name, MAY_IMPORT["streams/"]) for name in found)
    assert layer_of(probe) == "streams/"
    assert layer_of(APP / "gateway" / "hub.py") == "gateway/"


def test_every_lua_script_sits_next_to_the_code_that_loads_it() -> None:
    scripts = {path.stem for path in APP.rglob("*.lua")}
    loaded = set()
    for path in MODULES:
        for node in ast.walk(parse(path)):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "script" and len(node.args) == 2:
                names = [node.args[1]] + [e for k in node.keywords if k.arg == "after" for e in ast.walk(k.value)]
                for argument in names:
                    if isinstance(argument, ast.Constant) and isinstance(argument.value, str):
                        loaded.add((path.parent, argument.value))

    assert scripts, "the Redis scripts are .lua files"
    assert {name for _, name in loaded} == scripts
    assert all((folder / f"{name}.lua").is_file() for folder, name in loaded)


def test_only_settings_reads_the_environment() -> None:
    offenders = {rel(path): lines for path in MODULES if rel(path) != "settings.py" and (lines := reads_environ(path))}

    assert offenders == {}, "read configuration through app.settings.Settings, not os.environ"
