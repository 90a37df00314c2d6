"""The one way Custody reaches Gemini: the official SDK's async Interactions client.

Custody owns the retry decision. The SDK would retry `create` up to five times on
408/409/429/5xx, and a retried `create` with `store=true` can leave provider copies whose ids we
never see (wire reference §8). So the SDK's retries are off and this module retries itself:
with `store=false` a retry leaves nothing behind, so transient failures (408, 429, 5xx, a dropped
connection) are retried up to `attempts` times; with provider storage only a 429, which the
server refused before doing any work, is retried. Timeouts are never retried: the model may
still be working, and the caller's turn has already waited long enough.
"""

from __future__ import annotations

import asyncio
import json
import random
import re
import time
from dataclasses import dataclass, field
from typing import Any

from google import genai
from google.genai import _interactions as sdk_errors
from google.genai import types

from .config import API_REVISION, UpstreamSettings
from .errors import ConfigurationError, UpstreamFailed
from .metrics import Metrics

__all__ = ["Upstream", "UpstreamReply"]

_TRANSIENT = frozenset({408, 429, 500, 502, 503, 504})
# A turn continued over more interactions than this is refused rather than followed forever.
_MAX_HOPS = 16
_INTERACTION_ID = re.compile(r"[\x21-\x7e]{1,200}")
_MAX_RETRY_AFTER = 10.0
_PROBE_ID = "custody-startup-probe"


@dataclass(frozen=True)
class UpstreamReply:
    """The raw JSON of one turn (its hops merged), and what it took to get it."""

    body: dict[str, Any]
    latency_ms: float
    attempts: int
    # Every interaction the turn took, in order: each may be a copy the provider keeps.
    interaction_ids: list[str] = field(default_factory=list)
    # The exact JSON bytes of each of `body["steps"]`, in the same order.
    steps: list[bytes] = field(default_factory=list)


class Upstream:
    """Creates and deletes interactions; everything else about the SDK stays in here."""

    def __init__(
        self,
        settings: UpstreamSettings,
        *,
        attempts: int = 3,
        timeout_seconds: float = 120.0,
        base_url: str | None = None,
        api_key: str | None = None,
        metrics: Metrics | None = None,
    ) -> None:
        http_options = types.HttpOptions(
            base_url=base_url or settings.base_url,
            headers={"Api-Revision": API_REVISION},
            retry_options=types.HttpRetryOptions(attempts=1),
            timeout=int(timeout_seconds * 1000),
        )
        key = api_key or settings.api_key
        if settings.use_vertexai:
            # Vertex AI is the path Google's BAA covers for PHI: with an API key it is "express
            # mode"; without one the SDK uses Application Default Credentials for the project.
            self._client = genai.Client(
                vertexai=True,
                api_key=key,
                project=None if key else settings.project,
                location=None if key else settings.location,
                http_options=http_options,
            )
        else:
            self._client = genai.Client(api_key=key, http_options=http_options)
        self._attempts = max(1, attempts)
        self._metrics = metrics or Metrics.disabled()

    async def create(self, *, settings: dict[str, Any], steps: list[bytes], store: bool) -> UpstreamReply:
        """One turn with `steps` as its whole input; the reply's raw JSON.

        The history goes in `extra_body`, which the SDK sends untouched: passed as `input=` it
        would be re-validated and re-serialized, dropping nulls on fields it knows, and replay
        must send the same JSON values back.

        A turn the model answers over several interactions (`requires_continuation`) is continued
        here, as the SDK's own (switched off) automatic continuation would: each hop re-sends the
        route's settings and, with `store=false`, the whole input again, or with provider
        storage the previous hop's id. The hops are merged into one reply, and every hop's id is
        kept (each may be a copy the provider holds); a failure part-way names the ids so far.
        """
        started = time.perf_counter()
        hops: list[dict[str, Any]] = []
        attempts = 0
        steps_values = [json.loads(step) for step in steps]  # FIXME(bytes path): temporary
        extra: dict[str, Any] = {"input": steps_values}
        while True:
            try:
                body, used = await self._create_one(settings, store, extra)
            except UpstreamFailed as exc:
                exc.attempts += attempts
                exc.interaction_ids = _hop_ids(hops)
                self._metrics.upstream_failed(exc.code)
                raise
            hops.append(body)
            attempts += used
            token = body.get("continuation_token")
            if body.get("status") != "requires_continuation" or not isinstance(token, str) or not token:
                break
            if len(hops) >= _MAX_HOPS:
                self._metrics.upstream_failed("upstream_continuation_limit")
                raise UpstreamFailed(
                    "upstream_continuation_limit",
                    f"the model asked to continue past {_MAX_HOPS} interactions",
                    attempts=attempts,
                    interaction_ids=_hop_ids(hops),
                )
            extra = {"continuation_token": token}
            if store:
                extra["previous_interaction_id"] = body.get("id")
            else:
                extra["input"] = steps_values
        merged = _merge(hops)
        raw = [json.dumps(s, ensure_ascii=False, separators=(",", ":")).encode() for s in merged.get("steps") or []]
        return UpstreamReply(merged, (time.perf_counter() - started) * 1000, attempts, _hop_ids(hops), raw)

    async def _create_one(
        self, settings: dict[str, Any], store: bool, extra: dict[str, Any]
    ) -> tuple[dict[str, Any], int]:
        """One interaction, with Custody's retries; (raw JSON body, requests sent)."""
        for attempt in range(1, self._attempts + 1):
            try:
                with self._metrics.upstream_request("create", _request_outcome):
                    raw = await self._client.aio.interactions.with_raw_response.create(
                        **settings, store=store, extra_body=extra
                    )
                    body = json.loads(await raw.read())
            except sdk_errors.APITimeoutError:
                raise UpstreamFailed(
                    "upstream_timeout", "the model did not answer in time", timeout=True, attempts=attempt
                ) from None
            except sdk_errors.APIStatusError as exc:
                retry = exc.status_code in _TRANSIENT and (not store or exc.status_code == 429)
                if retry and attempt < self._attempts:
                    await asyncio.sleep(_backoff(attempt, exc.response.headers.get("retry-after")))
                    continue
                # The status only: upstream error bodies may quote the request's content.
                raise UpstreamFailed(
                    f"upstream_http_{exc.status_code}",
                    f"the model call failed with HTTP {exc.status_code}",
                    attempts=attempt,
                ) from None
            except sdk_errors.APIConnectionError:
                if not store and attempt < self._attempts:
                    await asyncio.sleep(_backoff(attempt, None))
                    continue
                raise UpstreamFailed(
                    "upstream_unreachable", "the model service could not be reached", attempts=attempt
                ) from None
            except (json.JSONDecodeError, RecursionError):
                raise UpstreamFailed(
                    "upstream_bad_response", "the model service sent a body that is not JSON", attempts=attempt
                ) from None
            if not isinstance(body, dict) or not isinstance(body.get("steps", []), list):
                raise UpstreamFailed(
                    "upstream_bad_response", "the model service sent an unexpected body", attempts=attempt
                )
            return body, attempt
        raise AssertionError("unreachable")  # the loop always returns or raises

    async def delete(self, interaction_id: str) -> bool:
        """Delete a provider-side copy; False when the provider no longer has it."""
        try:
            with self._metrics.upstream_request("delete", _request_outcome):
                await self._client.aio.interactions.delete(interaction_id)
        except sdk_errors.NotFoundError:
            return False
        return True

    async def verify(self) -> None:
        """Fail at startup, with a clear message, when the configured key or URL does not work.

        Reading an id that cannot exist costs nothing and creates nothing: a working key gets
        404 NOT_FOUND, a bad one 400/401/403.
        """
        try:
            await self._client.aio.interactions.get(_PROBE_ID)
        except sdk_errors.NotFoundError:
            return
        except sdk_errors.APIStatusError as exc:
            raise ConfigurationError(
                f"the Gemini API refused the configured credentials (HTTP {exc.status_code}); "
                "check GEMINI_API_KEY / GOOGLE_API_KEY or the Vertex AI settings"
            ) from None
        except sdk_errors.APIConnectionError:
            raise ConfigurationError(
                "the Gemini API could not be reached; check GOOGLE_GEMINI_BASE_URL and the network"
            ) from None

    async def aclose(self) -> None:
        await self._client.aio.aclose()


def _request_outcome(exc: BaseException) -> str:
    """How a request to the model service ended, for the metrics: a code, never a message."""
    if isinstance(exc, sdk_errors.APITimeoutError):
        return "timeout"
    if isinstance(exc, sdk_errors.NotFoundError):
        return "not_found"
    if isinstance(exc, sdk_errors.APIStatusError):
        return f"http_{exc.status_code}"
    if isinstance(exc, sdk_errors.APIConnectionError):
        return "unreachable"
    if isinstance(exc, (json.JSONDecodeError, RecursionError)):
        return "bad_response"
    return "cancelled" if isinstance(exc, asyncio.CancelledError) else "error"


def _hop_ids(hops: list[dict[str, Any]]) -> list[str]:
    """The interaction ids of the hops, when they are plausible ids: they go into the ledger and
    audit records, which must never hold arbitrary text from a response."""
    return [hop["id"] for hop in hops if isinstance(hop.get("id"), str) and _INTERACTION_ID.fullmatch(hop["id"])]


def _merge(hops: list[dict[str, Any]]) -> dict[str, Any]:
    """One reply from a turn's hops, as the SDK merges them: steps in order (a continuation's
    leading user_input, the turn's input again, dropped), usage summed, the rest from the last."""
    if len(hops) == 1:
        return hops[0]
    merged = dict(hops[-1])
    steps: list[Any] = list(hops[0].get("steps") or [])
    usage: dict[str, int] = {}
    for index, hop in enumerate(hops):
        hop_steps = list(hop.get("steps") or [])
        if index and hop_steps and isinstance(hop_steps[0], dict) and hop_steps[0].get("type") == "user_input":
            hop_steps = hop_steps[1:]
        if index:
            steps.extend(hop_steps)
        for name, value in (hop.get("usage") or {}).items():
            if isinstance(value, int) and not isinstance(value, bool):
                usage[name] = usage.get(name, 0) + value
    merged["steps"] = steps
    merged["usage"] = usage
    return merged


def _backoff(attempt: int, retry_after: str | None) -> float:
    if retry_after:
        try:
            return min(max(float(retry_after), 0.0), _MAX_RETRY_AFTER)
        except ValueError:
            pass
    base: float = min(0.25 * 2.0 ** (attempt - 1), 4.0)
    return base * random.uniform(0.75, 1.0)  # noqa: S311 - jitter that spreads retries, not a secret
