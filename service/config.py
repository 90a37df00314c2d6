"""Settings read from the environment (12-factor), once, by the composition root."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

__all__ = [
    "API_REVISION",
    "EXAMPLE_POLICY",
    "LOG_FORMATS",
    "LOG_LEVELS",
    "MIGRATIONS_DIR",
    "PACKAGE_DATA",
    "REPO_ROOT",
    "SCHEMAS_DIR",
    "Settings",
    "UpstreamSettings",
]

# What the service reads from disk ships inside the package (pyproject.toml's package-data): in a
# checkout and an editable install service/ links to the top-level directories, and a wheel holds
# copies, so nothing here depends on a repository being present.
PACKAGE_DATA = Path(str(files("service")))
MIGRATIONS_DIR = PACKAGE_DATA / "migrations"
SCHEMAS_DIR = PACKAGE_DATA / "schemas"
EXAMPLE_POLICY = PACKAGE_DATA / "policy.example.yaml"
# The checkout this code was imported from, for the tests that compare checked-in files with the
# code; the service never reads through it (an installed wheel has no repository).
REPO_ROOT = Path(__file__).resolve().parents[1]
# The Interactions API surface we were verified against (reference §9); the SDK defines this
# value but does not send it, so Custody pins it by header on every call.
API_REVISION = "2026-05-20"
_TRUE = {"1", "true", "yes", "on"}
LOG_FORMATS = ("json", "text")
LOG_LEVELS = ("debug", "info", "warning", "error")


@dataclass(frozen=True)
class UpstreamSettings:
    """How to reach Gemini; all of it comes from the SDK's own variables."""

    api_key: str | None
    base_url: str | None
    use_vertexai: bool
    project: str | None
    location: str | None

    @property
    def configured(self) -> bool:
        """True when real credentials were given; otherwise the simulator stands in."""
        return bool(self.api_key) or (self.use_vertexai and bool(self.project))


@dataclass(frozen=True)
class Settings:
    database_url: str | None
    data_dir: Path
    policy_path: Path
    keyring_path: Path | None
    host: str
    port: int
    upstream: UpstreamSettings
    max_body_bytes: int = 1_000_000
    # Custody's own retry of transient upstream failures (the SDK's retries are switched off).
    upstream_attempts: int = 3
    upstream_timeout_seconds: float = 120.0
    # A turn's model call as a whole (every attempt, and the waits between them) ends by then; a
    # request's Request-Timeout header may shorten it, never lengthen it.
    turn_deadline_seconds: float = 180.0
    # The circuit breaker before the model service: this many failures in a row open it, and it
    # refuses turns at once for this long before letting a probe through.
    upstream_breaker_failures: int = 5
    upstream_breaker_open_seconds: float = 30.0
    # A turn's claim on its conversation lapses after this unless its holder renews it (every
    # third of it, while the model works), so a dead replica blocks a conversation for seconds.
    turn_lease_seconds: float = 10.0
    # How long a turn whose model call has answered keeps trying to store the reply while the
    # database is unreachable, and how long the caller waits for that before a 503.
    turn_store_retry_seconds: float = 300.0
    turn_store_wait_seconds: float = 10.0
    # Connections a replica keeps to the database (and as many again in a burst): every turn
    # holds one for its claim and its finish, never while the model works.
    database_pool_size: int = 10
    # This replica's cache of unwrapped data keys: how many, and for how long each (0 seconds: none).
    data_key_cache_size: int = 10_000
    data_key_cache_seconds: float = 300.0
    # How old a provider copy may be for a turn to chain onto it instead of replaying the history.
    provider_chain_max_age_seconds: float = 43_200.0
    # How often a replica asks the model whether a background turn it follows has ended.
    background_poll_seconds: float = 2.0
    # The Gemini simulator instead of Google: implied only by the zero-config run (no
    # DATABASE_URL); a deployment must ask for it with CUSTODY_USE_SIMULATOR.
    use_simulator: bool = False
    # The secrets outside the database; generated in the data dir only by the zero-config run.
    pepper_path: Path | None = None
    audit_signing_key_path: Path | None = None
    # Public keys of audit signing keys used before the current one (a PEM file, or a directory
    # of them): what they signed still verifies. Not secret, but read as strictly.
    audit_retired_public_keys_path: Path | None = None
    # The KEKs in an HSM instead of a keyring file (service/crypto/_pkcs11_keyring.py): the vendor's
    # PKCS#11 module, the token's label and a file holding its user PIN. All three, or none.
    pkcs11_module: Path | None = None
    pkcs11_token_label: str | None = None
    pkcs11_pin_path: Path | None = None
    # How often the service signs the audit chains' heads (0 turns it off; see `custody audit checkpoint`).
    audit_checkpoint_seconds: float = 300.0

    # --- Failed authentication and proxies (service/auth_failures.py, `custody serve`) ---------
    # Per replica, in memory: after this many failed authentications from one source address (an
    # IPv6 /64) in a window, every attempt from it is answered 429 until the window ends.
    auth_failure_limit: int = 20
    # After this many failed authentications on one real key id (from any sources) in a window,
    # its wrong secrets are answered 429; its right secret still works.
    auth_failure_key_limit: int = 50
    # The window of both limits, and of the summary records of repeated failures.
    auth_failure_window_seconds: float = 60.0
    # The reverse proxies whose X-Forwarded-For (and -Proto) is believed: addresses or CIDR
    # networks. Empty: proxy headers are ignored and the peer's own address is the client's.
    trusted_proxies: tuple[str, ...] = ()
    # --- end of failed authentication and proxies ---------------------------------------------

    # --- Retention (service/retention, `custody serve`) ----------------------------------------
    # How often the service runs the retention runner (service.retention.run_retention), in every
    # replica (runners share the work safely); 0 turns the periodic runner off (deadlines are
    # still recomputed at startup, and `custody retention run` still works).
    retention_interval_seconds: float = 3600.0
    # --- end of retention ----------------------------------------------------------------------

    # --- Draining (service/drain.py, `custody serve`) ----------------------------------------
    # On SIGTERM, how long the requests in flight (turns waiting on the model) get to finish
    # before they are cancelled and their turns given back. A Kubernetes pod's
    # terminationGracePeriodSeconds must cover it (ops/k8s: this + the preStop pause + 15 s).
    drain_seconds: float = 30.0
    # --- end of draining -------------------------------------------------------------------------
    # --- Metrics and logs (service/metrics_export.py, service/logs.py, `custody serve`) ---------
    # The bearer token a scraper sends to GET /metrics (a file, mode 0600); unset in a deployment:
    # /metrics is not served (OTLP export, if configured, goes on).
    metrics_token_path: Path | None = None
    # Add the tenant's id as a label to the per-tenant counters: more series, and the metrics then
    # say who the tenants are; off unless the operator asks.
    metrics_tenant_labels: bool = False
    # `json` (one object per line on stdout) or `text`; None: json in a deployment, text otherwise.
    log_format: str | None = None
    log_level: str = "info"
    # One line per HTTP request (method, route template, status, duration, request id).
    access_log: bool = True
    # --- end of metrics and logs ---------------------------------------------------------------
    # The key store (service/key_store): a second, small Postgres database holding one expiry key
    # per UTC day, kept apart from DATABASE_URL so that a backup of the service's database never
    # holds them. Required with DATABASE_URL; the zero-config run makes one in its embedded Postgres.
    key_store_url: str | None = None

    announcements: list[str] = field(default_factory=list, compare=False)

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env
        data_dir = Path(env.get("CUSTODY_DATA_DIR", "./.custody"))
        policy = env.get("CUSTODY_POLICY")
        keyring = env.get("CUSTODY_KEYRING")
        upstream = UpstreamSettings(
            # GOOGLE_API_KEY wins over GEMINI_API_KEY, as in the SDK.
            api_key=env.get("GOOGLE_API_KEY") or env.get("GEMINI_API_KEY") or None,
            base_url=env.get("GOOGLE_GEMINI_BASE_URL") or None,
            use_vertexai=env.get("GOOGLE_GENAI_USE_VERTEXAI", "").lower() in _TRUE,
            project=env.get("GOOGLE_CLOUD_PROJECT") or None,
            location=env.get("GOOGLE_CLOUD_LOCATION") or None,
        )
        return cls(
            database_url=env.get("DATABASE_URL") or None,
            data_dir=data_dir,
            policy_path=Path(policy) if policy else EXAMPLE_POLICY,
            keyring_path=Path(keyring) if keyring else None,
            host=env.get("CUSTODY_HOST", "127.0.0.1"),
            port=_port(env, "CUSTODY_PORT", 8000),
            upstream=upstream,
            max_body_bytes=_count(env, "CUSTODY_MAX_BODY_BYTES", 1_000_000),
            upstream_attempts=_count(env, "CUSTODY_UPSTREAM_ATTEMPTS", 3),
            upstream_timeout_seconds=_positive(env, "CUSTODY_UPSTREAM_TIMEOUT_SECONDS", 120.0),
            turn_deadline_seconds=_positive(env, "CUSTODY_TURN_DEADLINE_SECONDS", 180.0),
            upstream_breaker_failures=_count(env, "CUSTODY_UPSTREAM_BREAKER_FAILURES", 5),
            upstream_breaker_open_seconds=_positive(env, "CUSTODY_UPSTREAM_BREAKER_OPEN_SECONDS", 30.0),
            turn_lease_seconds=_number(env, "CUSTODY_TURN_LEASE_SECONDS", 10.0),
            turn_store_retry_seconds=_number(env, "CUSTODY_TURN_STORE_RETRY_SECONDS", 300.0),
            turn_store_wait_seconds=_number(env, "CUSTODY_TURN_STORE_WAIT_SECONDS", 10.0),
            database_pool_size=_count(env, "CUSTODY_DATABASE_POOL_SIZE", 10),
            data_key_cache_size=_count(env, "CUSTODY_DATA_KEY_CACHE_SIZE", 10_000),
            data_key_cache_seconds=_number(env, "CUSTODY_DATA_KEY_CACHE_SECONDS", 300.0),
            provider_chain_max_age_seconds=_number(env, "CUSTODY_PROVIDER_CHAIN_MAX_AGE_SECONDS", 43_200.0),
            background_poll_seconds=_positive(env, "CUSTODY_BACKGROUND_POLL_SECONDS", 2.0),
            use_simulator=_flag(env, "CUSTODY_USE_SIMULATOR"),
            pepper_path=_path(env, "CUSTODY_PEPPER_FILE"),
            audit_signing_key_path=_path(env, "CUSTODY_AUDIT_SIGNING_KEY"),
            audit_retired_public_keys_path=_path(env, "CUSTODY_AUDIT_RETIRED_PUBLIC_KEYS"),
            pkcs11_module=_path(env, "CUSTODY_PKCS11_MODULE"),
            pkcs11_token_label=env.get("CUSTODY_PKCS11_TOKEN_LABEL", "").strip() or None,
            pkcs11_pin_path=_path(env, "CUSTODY_PKCS11_PIN_FILE"),
            audit_checkpoint_seconds=_number(env, "CUSTODY_AUDIT_CHECKPOINT_SECONDS", 300.0),
            auth_failure_limit=_count(env, "CUSTODY_AUTH_FAILURE_LIMIT", 20),
            auth_failure_key_limit=_count(env, "CUSTODY_AUTH_FAILURE_KEY_LIMIT", 50),
            auth_failure_window_seconds=_positive(env, "CUSTODY_AUTH_FAILURE_WINDOW_SECONDS", 60.0),
            trusted_proxies=_networks(env, "CUSTODY_TRUSTED_PROXIES"),
            retention_interval_seconds=_number(env, "CUSTODY_RETENTION_INTERVAL_SECONDS", 3600.0),
            drain_seconds=_number(env, "CUSTODY_DRAIN_SECONDS", 30.0),
            metrics_token_path=_path(env, "CUSTODY_METRICS_TOKEN_FILE"),
            metrics_tenant_labels=_flag(env, "CUSTODY_METRICS_TENANT_LABELS"),
            log_format=_choice(env, "CUSTODY_LOG_FORMAT", LOG_FORMATS),
            log_level=_choice(env, "CUSTODY_LOG_LEVEL", LOG_LEVELS) or "info",
            access_log=_flag(env, "CUSTODY_ACCESS_LOG", default=True),
            key_store_url=env.get("CUSTODY_KEY_STORE_URL") or None,
        )

    @property
    def resolved_log_format(self) -> str:
        """JSON lines for a deployment (log shippers parse them), readable text for the zero-config run."""
        return self.log_format or ("json" if self.deployment else "text")

    @property
    def deployment(self) -> bool:
        """A real deployment (DATABASE_URL set) never falls back to a generated secret or the
        simulator; only the zero-config run does."""
        return self.database_url is not None

    def check(self) -> None:
        """Refuse settings that contradict each other."""
        from .errors import ConfigurationError

        # The holder renews its lease every third of it; below a few seconds a slow database
        # round trip alone could let a healthy turn's lease lapse.
        if self.turn_lease_seconds < 3:
            raise ConfigurationError(
                f"CUSTODY_TURN_LEASE_SECONDS ({self.turn_lease_seconds:g}) must be at least 3 seconds"
            )
        if self.turn_store_retry_seconds < self.turn_store_wait_seconds:
            raise ConfigurationError(
                "CUSTODY_TURN_STORE_RETRY_SECONDS must be at least CUSTODY_TURN_STORE_WAIT_SECONDS"
            )
        # The rest of the PKCS#11 settings is checked where the keyring is loaded (secret_files).
        if self.pkcs11_module is None and (self.pkcs11_token_label or self.pkcs11_pin_path):
            raise ConfigurationError(
                "CUSTODY_PKCS11_TOKEN_LABEL or CUSTODY_PKCS11_PIN_FILE is set without CUSTODY_PKCS11_MODULE: "
                "set the module for the PKCS#11 keyring, or unset them for the keyring file"
            )
        # Back-to-back runs would only load the database: each run walks every due conversation.
        if 0 < self.retention_interval_seconds < 1:
            raise ConfigurationError(
                f"CUSTODY_RETENTION_INTERVAL_SECONDS ({self.retention_interval_seconds:g}) must be 0 (off) "
                "or at least 1 second"
            )


def _number(env: Mapping[str, str], name: str, default: float) -> float:
    """A non-negative number from the environment, or a message naming the variable."""
    from .errors import ConfigurationError

    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise ConfigurationError(f"{name} must be a number of seconds, not {raw[:40]!r}") from None
    if not (value >= 0 and value != float("inf")):
        raise ConfigurationError(f"{name} must be a finite, non-negative number")
    return value


def _flag(env: Mapping[str, str], name: str, *, default: bool = False) -> bool:
    from .errors import ConfigurationError

    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in {"0", "false", "no", "off"}:
        return False
    raise ConfigurationError(f"{name} must be true or false, not {raw[:40]!r}")


def _choice(env: Mapping[str, str], name: str, choices: tuple[str, ...]) -> str | None:
    """One of `choices` (any case), or None when unset."""
    from .errors import ConfigurationError

    raw = env.get(name, "").strip().lower()
    if not raw:
        return None
    if raw not in choices:
        raise ConfigurationError(f"{name} must be one of {', '.join(choices)}, not {raw[:40]!r}")
    return raw


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name, "").strip()
    return Path(raw) if raw else None


def _port(env: Mapping[str, str], name: str, default: int) -> int:
    from .errors import ConfigurationError

    port = _count(env, name, default)
    if port > 65535:
        raise ConfigurationError(f"{name} must be a port number (1 to 65535)")
    return port


def _count(env: Mapping[str, str], name: str, default: int) -> int:
    """A whole number of at least 1 (a limit of 0 would refuse everyone)."""
    from .errors import ConfigurationError

    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not (raw.isascii() and raw.isdigit()) or int(raw) < 1:
        raise ConfigurationError(f"{name} must be a whole number of at least 1, not {raw[:40]!r}")
    return int(raw)


def _positive(env: Mapping[str, str], name: str, default: float) -> float:
    from .errors import ConfigurationError

    value = _number(env, name, default)
    if value <= 0:
        raise ConfigurationError(f"{name} must be more than 0 seconds")
    return value


def _networks(env: Mapping[str, str], name: str) -> tuple[str, ...]:
    """Comma-separated addresses or CIDR networks, each checked: uvicorn would quietly take a
    typo (or a network with host bits set) for a host name that never matches."""
    import ipaddress

    from .errors import ConfigurationError

    items = tuple(item.strip() for item in env.get(name, "").split(",") if item.strip())
    for item in items:
        try:
            ipaddress.ip_network(item)
        except ValueError:
            raise ConfigurationError(
                f"{name}: {item[:60]!r} is not an IP address or CIDR network (e.g. 10.0.0.0/8); "
                "list the proxies themselves, never `*`"
            ) from None
    return items
