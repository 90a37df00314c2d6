"""Settings read from the environment (12-factor), once, by the composition root."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

__all__ = ["API_REVISION", "REPO_ROOT", "Settings", "UpstreamSettings"]

REPO_ROOT = Path(__file__).resolve().parents[1]
# The Interactions API surface we were verified against (reference §9); the SDK defines this
# value but does not send it, so Custody pins it by header on every call.
API_REVISION = "2026-05-20"
_TRUE = {"1", "true", "yes", "on"}


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
    # A turn's claim on its conversation lapses after this, so a crashed replica cannot wedge it.
    turn_lease_seconds: float = 900.0
    # How often the service signs the audit chains' heads (0 turns it off; see `custody audit checkpoint`).
    audit_checkpoint_seconds: float = 300.0
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
            policy_path=Path(policy) if policy else REPO_ROOT / "ops" / "policy.example.yaml",
            keyring_path=Path(keyring) if keyring else None,
            host=env.get("CUSTODY_HOST", "127.0.0.1"),
            port=int(env.get("CUSTODY_PORT", "8000")),
            upstream=upstream,
            max_body_bytes=int(env.get("CUSTODY_MAX_BODY_BYTES", "1000000")),
            upstream_attempts=int(env.get("CUSTODY_UPSTREAM_ATTEMPTS", "3")),
            upstream_timeout_seconds=float(env.get("CUSTODY_UPSTREAM_TIMEOUT_SECONDS", "120")),
            turn_lease_seconds=float(env.get("CUSTODY_TURN_LEASE_SECONDS", "900")),
            audit_checkpoint_seconds=float(env.get("CUSTODY_AUDIT_CHECKPOINT_SECONDS", "300")),
        )

    def check(self) -> None:
        """Refuse settings that contradict each other."""
        from .errors import ConfigurationError

        # A healthy but slow turn must not lose its lease while Custody is still retrying it:
        # every attempt may take the full timeout, plus up to 10 s of Retry-After between them.
        worst_case = self.upstream_attempts * (self.upstream_timeout_seconds + 10)
        if self.turn_lease_seconds <= worst_case:
            raise ConfigurationError(
                f"CUSTODY_TURN_LEASE_SECONDS ({self.turn_lease_seconds:g}) must exceed "
                f"CUSTODY_UPSTREAM_ATTEMPTS x (CUSTODY_UPSTREAM_TIMEOUT_SECONDS + 10) = {worst_case:g}"
            )
