"""The one settings table: every config.yaml key with its type, default and help.

config.yaml is nested YAML; each leaf is addressed by its dotted name (``upstream.url``). Loading
rejects any key not in the table and any value of the wrong type, naming the key, so a typo stops
the start instead of silently running with a default. A few environment variables override keys
(see ``ENV_OVERRIDES``). Keys typed ``dict`` (limits, pricing, models) hold structures that their
own modules validate (``limitspec.parse_limits``, ``pricing.PriceTable``).
"""

from __future__ import annotations

import ipaddress
import os
from dataclasses import dataclass
from typing import Any

import yaml


class ConfigError(Exception):
    pass


@dataclass(frozen=True)
class Setting:
    key: str
    type: type | tuple[type, ...]
    default: Any
    help: str
    optional: bool = False  # may be null


MIB = 1024 * 1024

SETTINGS: tuple[Setting, ...] = (
    # -- listening -------------------------------------------------------------------------
    Setting("server.address", str, "127.0.0.1", "Address to listen on; 0.0.0.0 to serve other machines."),
    Setting("server.port", int, 8000, "Port for the OpenAI-compatible API (env PROXYD_PORT)."),
    Setting("server.max_body_bytes", int, 20 * MIB, "Largest request body accepted (413 above); images are big."),
    Setting("server.body_timeout_s", float, 60.0, "Time a client may take to send its request body."),
    Setting("server.idle_connection_timeout_s", float, 120.0, "Close client connections idle this long."),
    Setting(
        "server.write_stall_timeout_s",
        float,
        30.0,
        "A client that takes none of a response for this long (stopped reading) is cut off: the upstream "
        "request is dropped, freeing Ollama's slot, and what was relayed is billed.",
    ),
    Setting("server.max_connections_per_key", int, 256, "Concurrent requests one API key may hold open."),
    Setting(
        "server.max_connections",
        int,
        4096,
        "Client connections open at once; lowered at start to fit the open-file limit. At the cap the "
        "longest-idle connection is closed to make room, or the new one if all are in requests.",
    ),
    Setting(
        "server.header_timeout_s",
        float,
        10.0,
        "Close a new connection that sends no complete request head within this time.",
    ),
    Setting("server.shutdown_grace_s", float, 30.0, "On SIGTERM, how long in-flight requests may finish."),
    Setting("server.cors_origins", list, [], "Origins allowed by CORS; empty = CORS off."),
    # -- upstream (Ollama) -------------------------------------------------------------------
    Setting("upstream.url", str, "http://127.0.0.1:11434", "Ollama's base URL (env PROXYD_UPSTREAM)."),
    Setting("upstream.connect_timeout_s", float, 5.0, "Timeout to open a connection to Ollama."),
    Setting(
        "upstream.first_byte_timeout_s",
        float,
        300.0,
        "Wait for Ollama's first byte; a cold model load can take minutes (OLLAMA_LOAD_TIMEOUT is 5m).",
    ),
    Setting("upstream.idle_timeout_s", float, 60.0, "Longest gap allowed between two stream chunks."),
    Setting("upstream.pool_size", int, 512, "Keep-alive connections kept open to Ollama."),
    Setting("upstream.max_response_bytes", int, 64 * MIB, "Largest non-stream answer accepted from Ollama."),
    # -- several upstreams (issue #15; docs/DESIGN.md, "Several upstreams") ----------------------------
    Setting(
        "upstreams",
        list,
        [],
        "Upstreams to route across, each {name, url, kind: ollama|openai, api_key_env?, headers?, models?, "
        "weight?, max_in_flight?, pricing?}; empty = upstream.url as one Ollama named 'default'.",
    ),
    Setting("upstream.max_attempts", int, 3, "Upstreams tried per request while nothing reached the client."),
    Setting("upstream.probe_interval_s", float, 2.0, "Health probe (and Ollama /api/ps) of each upstream, every ..."),
    Setting("upstream.failures_to_eject", int, 3, "Failures in a row that take an upstream out of routing."),
    Setting("upstream.cooldown_s", float, 5.0, "How long an ejected upstream stays out before one trial request."),
    Setting("upstream.models_refresh_s", float, 60.0, "Refresh of discovered model lists (upstreams without models)."),
    # -- storage -----------------------------------------------------------------------------
    Setting("database.path", str, "./proxyd.db", "SQLite ledger file (env PROXYD_DB)."),
    Setting(
        "database.synchronous",
        str,
        "NORMAL",
        "SQLite synchronous mode: NORMAL survives kill -9 (may lose the last commits on power loss); "
        "FULL also survives power loss at a few ms per group commit.",
    ),
    Setting("database.batch_max", int, 512, "Most ledger writes grouped into one commit."),
    Setting(
        "database.pending_row_after_s",
        float,
        1.0,
        "A request still running after this long gets a 'pending' ledger row (expired at the next start "
        "if the process dies); faster requests are written once, when they end. 0 = always write it.",
    ),
    Setting(
        "database.backend",
        str,
        "sqlite",
        "sqlite (the embedded ledger at database.path, one process) or postgres (database.dsn: one ledger and "
        "one set of users and keys shared by several proxyd instances; see README 'Several instances').",
    ),
    Setting("database.dsn", str, None, "PostgreSQL DSN (postgresql://user@host:5432/db) when backend is postgres "
            "(env PROXYD_DATABASE_DSN).", optional=True),
    Setting(
        "database.write_wait_s",
        float,
        5.0,
        "postgres: how long a ledger write waits for PostgreSQL to come back before its request fails with "
        "503 (Retry-After); while it is unreachable new requests are refused at once with the same 503.",
    ),
    Setting(
        "database.instance_stale_s",
        float,
        30.0,
        "postgres: an instance whose heartbeat (every instance_stale_s / 6) is older than this is dead: its "
        "'pending' ledger rows are expired by the live instances. Rows of live instances are never touched.",
    ),
    # -- admission (limits shared by several instances) -----------------------------------------
    Setting(
        "admission.backend",
        str,
        "memory",
        "Where limits are counted and reserved: memory (this process; exact for one process; the default) or "
        "redis (admission.url: shared by every instance, exact across them). --workers N > 1 needs redis.",
    ),
    Setting("admission.url", str, None, "Redis URL for admission.backend redis (redis://host:6379/0).", optional=True),
    Setting("admission.key_prefix", str, "proxyd:", "Prefix of every Redis key proxyd uses (one per deployment)."),
    Setting(
        "admission.lease_s",
        float,
        15.0,
        "Reservations of an instance that stops renewing them (killed, partitioned) are released within "
        "this long plus one renewal interval; each instance renews all of its own every second (or lease_s / 3).",
    ),
    # -- admin ---------------------------------------------------------------------------------
    Setting("admin.token", str, None, "Bearer token of the admin API (env PROXYD_ADMIN_TOKEN).", optional=True),
    Setting("admin.address", str, None, "Serve the admin API on its own address (with admin.port).", optional=True),
    Setting("admin.port", int, None, "Serve the admin API on its own port instead of the main one.", optional=True),
    # -- metering --------------------------------------------------------------------------------
    Setting("limits", dict, {}, "limits.default, limits.models.<model>, limits.users.<user_id> (see README)."),
    Setting("pricing", dict, {}, "Per model (and default): input_per_million_usd and output_per_million_usd, both required."),
    Setting(
        "models",
        dict,
        {
            "llama3.2": {"tokenizer": "llama3", "template": "llama3", "context_window": 131072},
            "moondream": {"tokenizer": "llama3", "template": "moondream", "image_tokens": 729, "context_window": 2048},
        },
        "Per model (or model family before ':'): tokenizer, template, image_tokens, context_window, "
        "default_max_tokens.",
    ),
    Setting(
        "model_defaults",
        dict,
        {"tokenizer": "llama3", "template": "generic", "image_tokens": 768, "context_window": 8192},
        "Token-counting settings for models not listed under models.",
    ),
    Setting(
        "estimate.default_max_tokens",
        int,
        4096,
        "Completion budget reserved when a request sets no max_tokens (capped by the context left).",
    ),
    Setting(
        "estimate.min_completion_tokens",
        int,
        16,
        "When the default budget does not fit a user's remaining allowance it is shrunk, but not below this.",
    ),
    # -- images ---------------------------------------------------------------------------------
    Setting(
        "images.allow_private_networks",
        bool,
        False,
        "Fetch image URLs on private/loopback addresses. For local testing only: it opens an SSRF hole.",
    ),
    Setting("images.max_bytes", int, 10 * MIB, "Largest image fetched or decoded."),
    Setting("images.timeout_s", float, 10.0, "Total time to fetch one image URL."),
    Setting("images.connect_timeout_s", float, 3.0, "Connect timeout when fetching an image URL."),
    Setting("images.max_redirects", int, 3, "Redirects followed (each target checked again)."),
    Setting("images.max_dimension", int, 1024, "Downscale larger images before forwarding; 0 = never."),
    Setting("images.max_images", int, 8, "Images allowed in one request."),
    Setting("images.max_pixels", int, 40_000_000, "Largest image in pixels (width x height, from its header)."),
    Setting(
        "images.max_pixels_per_request",
        int,
        64_000_000,
        "Pixels decoded for all of a request's images together (a JPEG being downscaled decodes at 1/2-1/8 "
        "scale and counts so); checked from the headers before any image is decoded.",
    ),
    Setting(
        "images.decode_memory_bytes",
        int,
        256 * MIB,
        "Memory image decoding may use at once in the process (estimated per image from its header); "
        "decodes wait their turn, and an image that alone needs more is refused.",
    ),
    Setting(
        "images.deny_networks",
        list,
        [],
        "CIDRs image URLs may never reach, even with allow_private_networks (e.g. 169.254.169.254/32). "
        "The upstream's own address and port are always refused.",
    ),
    # -- observability ------------------------------------------------------------------------------
    Setting("metrics.enabled", bool, True, "Serve Prometheus metrics at /metrics."),
    Setting("metrics.per_user_labels", bool, False, "Label token metrics by user (cardinality!)."),
    Setting("logging.level", str, "INFO", "Log level: DEBUG, INFO, WARNING, ERROR or CRITICAL."),
    Setting("logging.access_log", bool, True, "One JSON line per request on the proxyd.access logger."),
)

BY_KEY = {s.key: s for s in SETTINGS}

# Environment variable -> (key, parser)
ENV_OVERRIDES = {
    "PROXYD_PORT": ("server.port", int),
    "PROXYD_UPSTREAM": ("upstream.url", str),
    "PROXYD_DB": ("database.path", str),
    "PROXYD_DATABASE_DSN": ("database.dsn", str),
    "PROXYD_ADMIN_TOKEN": ("admin.token", str),
}


class Config(dict):
    """Flat mapping of dotted key -> value, complete (every key present)."""

    def section(self, prefix: str) -> dict[str, Any]:
        """``section("images")`` -> {"max_bytes": ..., ...} without the prefix."""
        p = prefix + "."
        return {k[len(p):]: v for k, v in self.items() if k.startswith(p)}


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    if not isinstance(tree, dict):
        raise ConfigError(f"config: {prefix or 'top level'} must be a mapping")
    flat: dict[str, Any] = {}
    for name, value in tree.items():
        key = f"{prefix}{name}"
        if key in BY_KEY:
            flat[key] = value
        elif isinstance(value, dict) and any(k.startswith(key + ".") for k in BY_KEY):
            flat.update(_flatten(value, key + "."))
        else:
            raise ConfigError(f"config: unknown key '{key}'")
    return flat


def _check_type(setting: Setting, value: Any) -> Any:
    if value is None:
        if setting.optional:
            return None
        raise ConfigError(f"config: '{setting.key}' must not be null")
    expected = setting.type
    if expected is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if expected is int and isinstance(value, bool):
        raise ConfigError(f"config: '{setting.key}' must be an integer, got {value!r}")
    if not isinstance(value, expected):
        name = expected.__name__ if isinstance(expected, type) else expected
        raise ConfigError(f"config: '{setting.key}' must be of type {name}, got {type(value).__name__} {value!r}")
    return value


def _check_networks(key: str, networks: list) -> None:
    for net in networks:
        try:
            if not isinstance(net, str):  # ip_network(10) would quietly mean 0.0.0.10/32
                raise TypeError(net)
            ipaddress.ip_network(net, strict=False)
        except (TypeError, ValueError):
            raise ConfigError(
                f"config: '{key}' has {net!r}, which is not a network (write CIDRs such as 169.254.0.0/16 or fd00::/8)"
            ) from None


def load_config(path: str | None = None, overrides: dict[str, Any] | None = None, env: dict | None = None) -> Config:
    """Defaults <- YAML file <- environment <- explicit overrides (tests, command line)."""
    env = os.environ if env is None else env
    values: dict[str, Any] = {s.key: s.default for s in SETTINGS}
    path = path or env.get("PROXYD_CONFIG")
    if path:
        try:
            with open(path, encoding="utf-8") as fh:
                tree = yaml.safe_load(fh) or {}
        except OSError as exc:
            raise ConfigError(f"config: cannot read {path}: {exc}") from exc
        except yaml.YAMLError as exc:
            raise ConfigError(f"config: {path} is not valid YAML: {exc}") from exc
        for key, value in _flatten(tree).items():
            values[key] = _check_type(BY_KEY[key], value)
    for var, (key, parse) in ENV_OVERRIDES.items():
        if env.get(var):
            try:
                values[key] = parse(env[var])
            except ValueError as exc:
                raise ConfigError(f"config: environment {var}={env[var]!r} is not a valid {key}") from exc
    for key, value in (overrides or {}).items():
        if key not in BY_KEY:
            raise ConfigError(f"config: unknown key '{key}'")
        values[key] = _check_type(BY_KEY[key], value)
    if values["database.synchronous"].upper() not in ("NORMAL", "FULL"):
        raise ConfigError("config: 'database.synchronous' must be NORMAL or FULL")
    if values["database.backend"] not in ("sqlite", "postgres"):
        raise ConfigError("config: 'database.backend' must be sqlite or postgres")
    if values["database.backend"] == "postgres" and not values["database.dsn"]:
        raise ConfigError("config: database.backend postgres needs 'database.dsn' (postgresql://user@host:5432/db)")
    if values["server.max_connections"] < 1:
        raise ConfigError("config: 'server.max_connections' must be at least 1")
    if values["server.header_timeout_s"] <= 0:
        raise ConfigError("config: 'server.header_timeout_s' must be > 0")
    _check_networks("images.deny_networks", values["images.deny_networks"])
    if values["upstream.max_attempts"] < 1 or values["upstream.failures_to_eject"] < 1:
        raise ConfigError("config: 'upstream.max_attempts' and 'upstream.failures_to_eject' must be at least 1")
    values["upstreams"] = parse_upstreams(values["upstreams"], env)
    if values["admission.backend"] not in ("memory", "redis"):
        raise ConfigError("config: 'admission.backend' must be memory or redis")
    if values["admission.backend"] == "redis" and not str(values["admission.url"] or "").startswith(
            ("redis://", "rediss://", "unix://")):
        raise ConfigError("config: 'admission.url' must be a redis:// (or rediss://, unix://) URL with admission.backend redis")
    if values["admission.lease_s"] < 1:
        raise ConfigError("config: 'admission.lease_s' must be at least 1 (second)")
    levels = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
    if str(values["logging.level"]).upper() not in levels:
        raise ConfigError(f"config: 'logging.level' must be one of {', '.join(levels)}")
    return Config(values)


UPSTREAM_KINDS = ("ollama", "openai")
# key -> (types, required)
UPSTREAM_KEYS: dict[str, tuple[type | tuple[type, ...], bool]] = {
    "name": (str, True), "url": (str, True), "kind": (str, False), "api_key_env": (str, False),
    "headers": (dict, False), "models": (list, False), "weight": ((int, float), False),
    "max_in_flight": (int, False), "pricing": (dict, False),
}


def parse_upstreams(raw: list, env: Any) -> list[dict[str, Any]]:
    """Checks ``upstreams`` entry by entry (unknown keys, types, names unique, the credential's
    variable set) and returns them complete, the credential read from the environment once, here."""
    out: list[dict[str, Any]] = []
    for i, entry in enumerate(raw):
        where = f"upstreams[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"config: '{where}' must be a mapping with name and url")
        where = f"upstreams[{i}]" + (f" ({entry['name']})" if isinstance(entry.get("name"), str) else "")
        for key, value in entry.items():
            if key not in UPSTREAM_KEYS:
                raise ConfigError(f"config: unknown key '{where}.{key}' (known: {', '.join(UPSTREAM_KEYS)})")
            types = UPSTREAM_KEYS[key][0]
            if not isinstance(value, types) or isinstance(value, bool):
                raise ConfigError(f"config: '{where}.{key}' has the wrong type ({type(value).__name__} {value!r})")
        for key, (_, required) in UPSTREAM_KEYS.items():
            if required and key not in entry:
                raise ConfigError(f"config: '{where}' has no '{key}'")
        kind = entry.get("kind", "ollama")
        if kind not in UPSTREAM_KINDS:
            raise ConfigError(f"config: '{where}.kind' must be one of {', '.join(UPSTREAM_KINDS)}, not {kind!r}")
        if not entry["url"].startswith(("http://", "https://")):
            raise ConfigError(f"config: '{where}.url' must be an http:// or https:// URL")
        if not entry["name"] or any(u["name"] == entry["name"] for u in out):
            raise ConfigError(f"config: '{where}.name' must be non-empty and unique")
        headers = entry.get("headers") or {}
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in headers.items()):
            raise ConfigError(f"config: '{where}.headers' must map header names to strings")
        models = entry.get("models")
        if models is not None and not all(isinstance(m, str) and m for m in models):
            raise ConfigError(f"config: '{where}.models' must be a list of model names")
        weight = entry.get("weight", 1)
        if weight <= 0:
            raise ConfigError(f"config: '{where}.weight' must be > 0")
        max_in_flight = entry.get("max_in_flight")
        if max_in_flight is not None and max_in_flight < 1:
            raise ConfigError(f"config: '{where}.max_in_flight' must be at least 1")
        api_key = None
        if "api_key_env" in entry:
            api_key = env.get(entry["api_key_env"])
            if not api_key:
                raise ConfigError(f"config: '{where}.api_key_env' names {entry['api_key_env']}, which is not set")
        out.append({"name": entry["name"], "url": entry["url"].rstrip("/"), "kind": kind, "api_key": api_key,
                    "api_key_env": entry.get("api_key_env"), "headers": headers, "models": models,
                    "weight": float(weight), "max_in_flight": max_in_flight, "pricing": entry.get("pricing") or {}})
    return out


def describe() -> str:
    """The table as text (``python app.py --print-settings``)."""
    rows = []
    for s in SETTINGS:
        t = s.type.__name__ if isinstance(s.type, type) else str(s.type)
        rows.append(f"{s.key} ({t}, default {s.default!r})\n    {s.help}")
    return "\n".join(rows)
