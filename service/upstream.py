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
import time
from dataclasses import dataclass
from typing import Any

from google import genai
from google.genai import _interactions as sdk_errors
from google.genai import types

from .config import API_REVISION, UpstreamSettings
from .errors import ConfigurationError, UpstreamFailed

__all__ = ["Upstream", "UpstreamReply"]

_TRANSIENT = frozenset({408, 429, 500, 502, 503, 504})
_MAX_RETRY_AFTER = 10.0
_PROBE_ID = "custody-startup-probe"


@dataclass(frozen=True)
class UpstreamReply:
    """The raw JSON of one interaction, and what it took to get it."""

    body: dict[str, Any]
    latency_ms: float
    attempts: int


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

    async def create(self, *, settings: dict[str, Any], steps: list[Any], store: bool) -> UpstreamReply:
        """One interaction with `steps` as its whole input; the reply's raw JSON.

        The history goes in `extra_body`, which the SDK sends untouched: passed as `input=` it
        would be re-validated and re-serialized, dropping nulls on fields it knows (reference
        §3), and invariant 3 asks for the same JSON values back.
        """
        started = time.perf_counter()
        for attempt in range(1, self._attempts + 1):
            try:
                raw = await self._client.aio.interactions.with_raw_response.create(
                    **settings, store=store, extra_body={"input": steps}
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
            return UpstreamReply(body, (time.perf_counter() - started) * 1000, attempt)
        raise AssertionError("unreachable")  # the loop always returns or raises

    async def delete(self, interaction_id: str) -> bool:
        """Delete a provider-side copy; False when the provider no longer has it."""
        try:
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


def _backoff(attempt: int, retry_after: str | None) -> float:
    if retry_after:
        try:
            return min(max(float(retry_after), 0.0), _MAX_RETRY_AFTER)
        except ValueError:
            pass
    base: float = min(0.25 * 2.0 ** (attempt - 1), 4.0)
    return base * random.uniform(0.75, 1.0)
