"""The one way Custody reaches Gemini: the official SDK's async Interactions client.

Custody owns the retry decision. The SDK would retry `create` up to five times on
408/409/429/5xx, and a retried `create` with `store=true` can leave provider copies whose ids we
never see. So the SDK's retries are off and this module retries itself: with `store=false` a
retry leaves nothing behind, so transient failures (408, 429, 5xx, a dropped connection, an
attempt that timed out) are retried up to `attempts` times; with provider storage only a 429,
which the server refused before doing any work, is retried. Between attempts it waits what the
service asked for (`Retry-After` in seconds or as an HTTP date, or `retry-after-ms`; a wait over
10 s is not waited but handed to the caller), otherwise a fully jittered exponential backoff. A
turn's deadline bounds all of it: each attempt's timeout is cut to what is left, and no retry
starts that could not start in time. A circuit breaker (service/circuit_breaker.py) stops the
attempts altogether while the model service keeps failing.

`create` is the turn's hot path and does not use the SDK's typed `create`, which builds pydantic
models for the whole history and serializes it again on every call (most of the service's CPU
on a long conversation). The history arrives as the exact JSON bytes of each step and is spliced
into the request body as it is, and the reply's steps leave as the exact bytes the API sent
(service/json_spans.py), so a replayed step is byte-for-byte what the model produced. The body
still goes through the SDK's own request building, auth and HTTP client, and its failures come
back as the SDK's error classes (`_sdk_create_sender`): the same method, URL, headers and
timeout as the typed `create` (tests/test_upstream_wire.py compares the two on the wire).
"""

from __future__ import annotations

import asyncio
import email.utils
import json
import random
import re
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from google import genai
from google.genai import _interactions as sdk_errors
from google.genai import types

from .circuit_breaker import BREAKER_STATES, BreakerOpen, CircuitBreaker
from .config import API_REVISION, UpstreamSettings
from .errors import ConfigurationError, UpstreamFailed
from .json_spans import split_steps
from .metrics import Metrics
from .upstream_stream import AssemblyError, StepAssembler, UpstreamErrorEvent, sdk_stream_opener, sse_events

__all__ = ["HISTORY_SENT", "Chain", "Upstream", "UpstreamReply"]

_TRANSIENT = frozenset({408, 429, 500, 502, 503, 504})
# A turn continued over more interactions than this is refused rather than followed forever.
_MAX_HOPS = 16
_INTERACTION_ID = re.compile(r"[\x21-\x7e]{1,200}")
_MAX_RETRY_AFTER = 10.0
_PROBE_ID = "custody-startup-probe"
# What a reply body that is not one JSON object (or not UTF-8, or nested too deep) raises.
_NOT_JSON = (json.JSONDecodeError, UnicodeDecodeError, RecursionError)

# One hop as it came back: the parsed body, and the exact bytes of each of its steps.
_Hop = tuple[dict[str, Any], list[bytes]]


@dataclass(frozen=True)
class UpstreamReply:
    """The raw JSON of one turn (its hops merged), and what it took to get it."""

    body: dict[str, Any]
    latency_ms: float
    attempts: int
    # Every interaction the turn took, in order: each may be a copy the provider keeps.
    interaction_ids: list[str] = field(default_factory=list)
    # The exact bytes of each step of `body["steps"]`, in the same order, as the API sent them.
    steps: list[bytes] = field(kw_only=True, repr=False)
    # How the history reached the model (see `HISTORY_SENT`).
    history_sent: str = field(default="replayed", kw_only=True)
    # Which surface answered: `interactions`, or `generate_content` when the route's fallback
    # took the turn (service/generate_content.py), and then why (`circuit_open`, ...).
    surface: str = field(default="interactions", kw_only=True)
    fallback_reason: str | None = field(default=None, kw_only=True)


# How a turn's history reached the model: all of it in `input`; only the new input, chained onto
# the provider's copy of the rest with `previous_interaction_id`; or all of it after the provider
# answered that the copy to chain onto is gone.
HISTORY_SENT = ("replayed", "chained", "replayed_after_chain_lost")


@dataclass(frozen=True)
class Chain:
    """The provider's copy of a conversation's history up to now, to chain a turn onto: the
    interaction that holds it, and how many of the turn's steps (the last ones) are new."""

    interaction_id: str
    new_steps: int


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
        breaker_failures: int = 5,
        breaker_open_seconds: float = 30.0,
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
        self._send_create = _sdk_create_sender(self._client)
        self._open_stream = sdk_stream_opener(self._client)
        self._attempts = max(1, attempts)
        self._timeout = timeout_seconds
        self._metrics = metrics or Metrics.disabled()
        # One breaker for the one model service this client reaches (its base URL and credentials).
        self.breaker = CircuitBreaker(
            failure_threshold=breaker_failures,
            open_seconds=breaker_open_seconds,
            on_change=self._metrics.upstream_breaker,
        )
        self._metrics.watch_upstream_breaker(lambda: BREAKER_STATES[self.breaker.state])

    async def create(
        self,
        *,
        settings: dict[str, Any],
        steps: Sequence[bytes],
        store: bool,
        chain: Chain | None = None,
        deadline: float | None = None,
    ) -> UpstreamReply:
        """One turn with `steps` as its whole input; the reply's raw JSON.

        With a `chain` (only with provider storage), only the new steps are sent, with
        `previous_interaction_id` naming the provider's copy of the rest: the history the model
        sees is the same, the request a fraction of the size. When the provider answers that the
        copy is gone (expired, deleted, never stored: 404 or 410, or a 400 that names the field),
        the turn is sent again with the whole history, as a fresh chain; the reply says which
        way the history went (`history_sent`). Nothing of a refused chained request is kept by
        the provider, so the fallback leaves no copy behind.

        `deadline` (a `time.monotonic()` instant) bounds the whole turn: every attempt, the waits
        between them, continuations and a fallback; an attempt's timeout shrinks to what is left,
        and a retry that could not start before it is not made.
        """
        if chain is None or not store:
            return await self._create_turn(settings, steps, store, None, deadline=deadline)
        try:
            return await self._create_turn(
                settings, steps[len(steps) - chain.new_steps :], store, chain.interaction_id, deadline=deadline
            )
        except _ChainLost as lost:
            spent = lost.attempts
        except UpstreamFailed as exc:
            exc.history_sent = "chained"
            raise
        try:
            reply = await self._create_turn(settings, steps, store, None, spent=spent, deadline=deadline)
        except UpstreamFailed as exc:
            exc.history_sent = "replayed_after_chain_lost"
            raise
        return replace(reply, history_sent="replayed_after_chain_lost")

    async def _create_turn(
        self,
        settings: dict[str, Any],
        steps: Sequence[bytes],
        store: bool,
        previous_interaction_id: str | None,
        *,
        spent: int = 0,
        deadline: float | None = None,
    ) -> UpstreamReply:
        """One turn: its first interaction, and any continuations it asks for. `spent`: requests
        the turn sent before this (a chained attempt refused), counted in its attempts.

        `steps` are the exact JSON bytes of each input step (one JSON value each, as stored or
        as the API sent it): they go into the body's `input` array as they are, never parsed or
        re-serialized, so replay sends the same bytes back. `settings` (the route's model and
        settings) are serialized once per call.

        A turn the model answers over several interactions (`requires_continuation`) is continued
        here, as the SDK's own (switched off) automatic continuation would: each hop re-sends the
        route's settings and, with `store=false`, the whole input again, or with provider
        storage the previous hop's id. The hops are merged into one reply, and every hop's id is
        kept (each may be a copy the provider holds); a failure part-way names the ids so far.
        """
        started = time.perf_counter()
        hops: list[_Hop] = []
        attempts = spent
        # The input array is joined once and re-sent as it is by every hop that needs it.
        input_array = b"[" + b",".join(steps) + b"]"
        first = {"previous_interaction_id": previous_interaction_id} if previous_interaction_id else {}
        body = _request_body(settings, store, first, input_array)
        while True:
            try:
                hop, used = await self._create_one(
                    body, store, chained=bool(previous_interaction_id) and not hops, deadline=deadline
                )
            except UpstreamFailed as exc:
                exc.attempts += attempts
                exc.interaction_ids = _hop_ids(hops)
                self._metrics.upstream_failed(exc.code)
                raise
            hops.append(hop)
            attempts += used
            token = hop[0].get("continuation_token")
            if hop[0].get("status") != "requires_continuation" or not isinstance(token, str) or not token:
                break
            if len(hops) >= _MAX_HOPS:
                self._metrics.upstream_failed("upstream_continuation_limit")
                raise UpstreamFailed(
                    "upstream_continuation_limit",
                    f"the model asked to continue past {_MAX_HOPS} interactions",
                    attempts=attempts,
                    interaction_ids=_hop_ids(hops),
                )
            if store:
                body = _request_body(
                    settings, store, {"continuation_token": token, "previous_interaction_id": hop[0].get("id")}, None
                )
            else:
                body = _request_body(settings, store, {"continuation_token": token}, input_array)
        merged, merged_steps = _merge(hops)
        return UpstreamReply(
            merged,
            (time.perf_counter() - started) * 1000,
            attempts,
            _hop_ids(hops),
            steps=merged_steps,
            history_sent="chained" if previous_interaction_id else "replayed",
        )

    async def _create_one(
        self, body: bytes, store: bool, *, chained: bool = False, deadline: float | None = None
    ) -> tuple[_Hop, int]:
        """One interaction, with Custody's retries; ((parsed body, step bytes), requests sent).
        `chained`: the body names a previous interaction, and a refusal that says it is gone
        raises `_ChainLost`. `deadline`: see `create`.

        The rule is the module's (store-aware, Retry-After in seconds or as an HTTP date, full
        jitter otherwise), written out here rather than through a retry library: it needs the
        response's status, store and headers at every decision, a per-attempt timeout cut to the
        deadline, and the breaker's verdict before each attempt, which would all be callbacks
        around a library's loop, each harder to read than the loop itself."""
        breaker = self.breaker
        for attempt in range(1, self._attempts + 1):
            timeout = self._timeout
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _deadline_passed(attempt - 1)
                timeout = min(timeout, left)
            self._admit(attempt)
            verdict = False
            try:
                with self._metrics.upstream_request("create", _request_outcome):
                    parsed, step_bytes = split_steps(await self._send_create(body, timeout))
                breaker.record_success()
                verdict = True
            except sdk_errors.APITimeoutError:
                breaker.record_failure()
                verdict = True
                if timeout < self._timeout:
                    raise _deadline_passed(attempt) from None
                # A hung attempt without provider storage left nothing behind: another may answer,
                # within the turn's deadline. With storage the model may still be working on a copy.
                if not store and attempt < self._attempts and _in_time(deadline, 0.0):
                    continue
                raise UpstreamFailed(
                    "upstream_timeout", "the model did not answer in time", timeout=True, attempts=attempt
                ) from None
            except sdk_errors.APIStatusError as exc:
                verdict = True
                await asyncio.sleep(self._wait_after(exc, store, chained, attempt, deadline))
                continue
            except sdk_errors.APIConnectionError:
                breaker.record_failure()
                verdict = True
                wait = _backoff(attempt)
                if not store and attempt < self._attempts and _in_time(deadline, wait):
                    await asyncio.sleep(wait)
                    continue
                raise UpstreamFailed(
                    "upstream_unreachable", "the model service could not be reached", attempts=attempt
                ) from None
            except _NOT_JSON:
                breaker.record_failure()
                verdict = True
                raise UpstreamFailed(
                    "upstream_bad_response", "the model service sent a body that is not JSON", attempts=attempt
                ) from None
            finally:
                if not verdict:
                    breaker.record_abandoned()  # cancelled mid-request: no verdict on the service
            if not isinstance(parsed.get("steps", []), list):
                raise UpstreamFailed(
                    "upstream_bad_response", "the model service sent an unexpected body", attempts=attempt
                )
            return (parsed, step_bytes), attempt
        raise AssertionError("unreachable")  # the loop always returns or raises

    async def generate_content(
        self, *, settings: dict[str, Any], steps: Sequence[bytes], deadline: float | None = None
    ) -> UpstreamReply:
        """The turn through `models.generate_content` instead, with this client, its attempts and
        timeout: the route's fallback (service/generate_content.py). Not behind the breaker, which
        watches the Interactions surface: that surface failing is when this is called."""
        # Imported here: service/generate_content.py builds on this module.
        from .generate_content import generate_turn

        return await generate_turn(
            self._client,
            settings=settings,
            steps=steps,
            attempts=self._attempts,
            timeout_seconds=self._timeout,
            deadline=deadline,
            metrics=self._metrics,
        )

    async def create_stream(
        self,
        *,
        settings: dict[str, Any],
        steps: Sequence[bytes],
        store: bool,
        chain: Chain | None = None,
        on_event: Callable[[dict[str, Any], dict[str, Any] | None], Awaitable[None]],
    ) -> UpstreamReply:
        """One turn as `create` takes it, but streamed (`"stream": true`): each event is handed to
        `on_event(event, step)` as it arrives (`step`: the step it belongs to, as assembled so
        far), and the reply is the steps assembled from the events as the non-streaming answer
        would carry them (service/upstream_stream.py). Chained and falling back as `create` does.

        Retried as `create` is, but only until the stream opens: once events have been handed on
        a retry would be a second answer, so a failure mid-stream fails the turn. A turn the model
        would answer over several interactions (`requires_continuation`) is not continued while
        streaming: it fails (`upstream_stream_continuation`), and a non-streaming turn takes it."""
        if chain is None or not store:
            return await self._stream_turn(settings, steps, store, None, on_event)
        try:
            return await self._stream_turn(
                settings, steps[len(steps) - chain.new_steps :], store, chain.interaction_id, on_event
            )
        except _ChainLost as lost:
            spent = lost.attempts
        except UpstreamFailed as exc:
            exc.history_sent = "chained"
            raise
        try:
            reply = await self._stream_turn(settings, steps, store, None, on_event, spent=spent)
        except UpstreamFailed as exc:
            exc.history_sent = "replayed_after_chain_lost"
            raise
        return replace(reply, history_sent="replayed_after_chain_lost")

    async def _stream_turn(
        self,
        settings: dict[str, Any],
        steps: Sequence[bytes],
        store: bool,
        previous_interaction_id: str | None,
        on_event: Callable[[dict[str, Any], dict[str, Any] | None], Awaitable[None]],
        *,
        spent: int = 0,
    ) -> UpstreamReply:
        started = time.perf_counter()
        fields: dict[str, Any] = {"stream": True}
        if previous_interaction_id:
            fields["previous_interaction_id"] = previous_interaction_id
        body = _request_body(settings, store, fields, b"[" + b",".join(steps) + b"]")
        try:
            assembled, attempts = await self._stream_one(body, store, bool(previous_interaction_id), on_event)
        except UpstreamFailed as exc:
            exc.attempts += spent
            self._metrics.upstream_failed(exc.code)
            raise
        attempts += spent
        parsed, step_bytes = assembled.result()
        ids = _hop_ids([(parsed, step_bytes)])
        if parsed.get("status") == "requires_continuation":
            self._metrics.upstream_failed("upstream_stream_continuation")
            raise UpstreamFailed(
                "upstream_stream_continuation",
                "the model asked to continue a streamed turn over another interaction",
                attempts=attempts,
                interaction_ids=ids,
            )
        return UpstreamReply(
            parsed,
            (time.perf_counter() - started) * 1000,
            attempts,
            ids,
            steps=step_bytes,
            history_sent="chained" if previous_interaction_id else "replayed",
        )

    async def _stream_one(
        self,
        body: bytes,
        store: bool,
        chained: bool,
        on_event: Callable[[dict[str, Any], dict[str, Any] | None], Awaitable[None]],
    ) -> tuple[StepAssembler, int]:
        """One streamed interaction, its opening retried as `_create_one` retries; the assembler
        that folded its events, and the requests sent."""
        breaker = self.breaker
        for attempt in range(1, self._attempts + 1):
            assembler = StepAssembler()
            opened = False
            self._admit(attempt)
            verdict = False
            try:
                with self._metrics.upstream_request("create", _request_outcome):
                    async with self._open_stream(body) as chunks:
                        opened = True
                        async for event in sse_events(chunks):
                            assembler.add(event)
                            await on_event(event, _event_step(assembler, event))
                breaker.record_success()
                verdict = True
            except sdk_errors.APITimeoutError:
                breaker.record_failure()
                verdict = True
                raise UpstreamFailed(
                    "upstream_timeout", "the model did not answer in time", timeout=True, attempts=attempt
                ) from None
            except sdk_errors.APIStatusError as exc:
                # Only until the stream opens: a status error comes before any event.
                verdict = True
                await asyncio.sleep(self._wait_after(exc, store, chained, attempt, None))
                continue
            except sdk_errors.APIConnectionError:
                breaker.record_failure()
                verdict = True
                if not opened and not store and attempt < self._attempts:
                    await asyncio.sleep(_backoff(attempt))
                    continue
                raise UpstreamFailed(
                    "upstream_unreachable", "the model service could not be reached", attempts=attempt
                ) from None
            except UpstreamErrorEvent:
                # Its message stays out: it may quote the request.
                raise UpstreamFailed(
                    "upstream_stream_error", "the model service ended the stream with an error", attempts=attempt
                ) from None
            except AssemblyError:
                # The reason stays out of the message: it may name what the upstream sent.
                raise UpstreamFailed(
                    "upstream_bad_response", "the model service sent a stream Custody cannot store", attempts=attempt
                ) from None
            finally:
                if not verdict:
                    breaker.record_abandoned()
            return assembler, attempt
        raise AssertionError("unreachable")  # the loop always returns or raises

    def _admit(self, attempt: int) -> None:
        """Let attempt `attempt` go, or refuse it at once while the breaker is open."""
        try:
            self.breaker.before_request()
        except BreakerOpen as refused:
            raise UpstreamFailed(
                "upstream_circuit_open",
                "the model service has been failing; requests are refused for a while",
                attempts=attempt - 1,
                unavailable=True,
                retry_after=refused.retry_after,
            ) from None

    def _wait_after(
        self,
        exc: sdk_errors.APIStatusError,
        store: bool,
        chained: bool,
        attempt: int,
        deadline: float | None,
    ) -> float:
        """What a create answered with an error status comes to: the breaker's verdict on the
        service, then the seconds to wait before retrying, or the failure (`_ChainLost` when a
        chained request's previous interaction is gone)."""
        status = exc.status_code or 0
        # A server error says the service is unwell; any other answer says it is up.
        if status >= 500 or status == 408:
            self.breaker.record_failure()
        else:
            self.breaker.record_success()
        if chained and _chain_gone(exc):
            raise _ChainLost(attempt) from None
        asked = _retry_after(exc.response.headers)
        # A wait the service asks for is kept (0 means "no preference": the backoff); one longer
        # than this turn should wait goes back to the caller instead.
        retry = status in _TRANSIENT and (not store or status == 429) and (asked or 0) <= _MAX_RETRY_AFTER
        wait = asked or _backoff(attempt)
        if retry and attempt < self._attempts and _in_time(deadline, wait):
            return wait
        # The status only: upstream error bodies may quote the request's content.
        raise UpstreamFailed(
            f"upstream_http_{status}",
            f"the model call failed with HTTP {status}",
            attempts=attempt,
            upstream_status=status,
            unavailable=status in {429, 503},
            retry_after=asked,
        ) from None

    async def delete(self, interaction_id: str) -> bool:
        """Delete a provider-side copy; False when the provider no longer has it."""
        try:
            with self._metrics.upstream_request("delete", _request_outcome):
                await self._client.aio.interactions.delete(interaction_id)
        except sdk_errors.NotFoundError:
            return False
        return True

    async def start_background(
        self, *, settings: dict[str, Any], steps: Sequence[bytes], chain: Chain | None = None
    ) -> tuple[str, int, str]:
        """Start a background turn (`background=true, store=true`) with `steps` as its whole input,
        sent as their exact bytes like `create`, or chained onto the provider's copy of the
        history as `create` chains (falling back to the whole history when it is gone); (the
        interaction's id, requests sent, how the history went). The model works on it after the
        call returns: `get` shows when it is done. Retried as a stored create is (only a 429),
        since a retried create could leave a copy whose id we never see."""
        spent = 0
        if chain is not None:
            try:
                started = await self._start_background(settings, steps[len(steps) - chain.new_steps :], chain, 0)
            except _ChainLost as lost:
                spent = lost.attempts
            except UpstreamFailed as exc:
                exc.history_sent = "chained"
                raise
            else:
                return (*started, "chained")
        try:
            started = await self._start_background(settings, steps, None, spent)
        except UpstreamFailed as exc:
            exc.history_sent = "replayed_after_chain_lost" if chain else "replayed"
            raise
        return (*started, "replayed_after_chain_lost" if chain else "replayed")

    async def _start_background(
        self, settings: dict[str, Any], steps: Sequence[bytes], chain: Chain | None, spent: int
    ) -> tuple[str, int]:
        fields: dict[str, Any] = {"background": True}
        if chain is not None:
            fields["previous_interaction_id"] = chain.interaction_id
        body = _request_body(settings, True, fields, b"[" + b",".join(steps) + b"]")
        try:
            (parsed, _), attempts = await self._create_one(body, True, chained=chain is not None)
        except UpstreamFailed as exc:
            exc.attempts += spent
            self._metrics.upstream_failed(exc.code)
            raise
        attempts += spent
        interaction_id = parsed.get("id")
        if not isinstance(interaction_id, str) or not _INTERACTION_ID.fullmatch(interaction_id):
            self._metrics.upstream_failed("upstream_bad_response")
            raise UpstreamFailed(
                "upstream_bad_response", "the model service did not name the background interaction", attempts=attempts
            )
        return interaction_id, attempts

    async def get(self, interaction_id: str) -> tuple[dict[str, Any], list[bytes]] | None:
        """A stored interaction as it is now: (the parsed body, the exact bytes of each of its
        steps, as `create` keeps them), or None when the provider no longer has it. One request,
        never retried here: the caller polls again. Fails as `create` does (UpstreamFailed)."""
        try:
            with self._metrics.upstream_request("get", _request_outcome):
                # The raw response: the typed one would parse the steps into models, and the
                # bytes stored must be the very ones the API sent (see json_spans).
                response = await self._client.aio.interactions.with_raw_response.get(interaction_id)
                parsed, step_bytes = split_steps(await response.read())
        except sdk_errors.NotFoundError:
            return None
        except sdk_errors.APITimeoutError:
            raise UpstreamFailed("upstream_timeout", "the model service did not answer in time", timeout=True) from None
        except sdk_errors.APIStatusError as exc:
            raise UpstreamFailed(
                f"upstream_http_{exc.status_code}", f"reading the interaction failed with HTTP {exc.status_code}"
            ) from None
        except sdk_errors.APIConnectionError:
            raise UpstreamFailed("upstream_unreachable", "the model service could not be reached") from None
        except _NOT_JSON:
            raise UpstreamFailed("upstream_bad_response", "the model service sent a body that is not JSON") from None
        if not isinstance(parsed.get("steps", []), list):
            raise UpstreamFailed("upstream_bad_response", "the model service sent an unexpected body")
        return parsed, step_bytes

    async def cancel(self, interaction_id: str) -> bool:
        """Cancel a background interaction; False when there was nothing to cancel (it had ended
        already, or the provider no longer has it). Other failures raise UpstreamFailed."""
        try:
            with self._metrics.upstream_request("cancel", _request_outcome):
                await self._client.aio.interactions.cancel(interaction_id)
        except sdk_errors.NotFoundError:
            return False
        except sdk_errors.APIStatusError as exc:
            if exc.status_code in (400, 409):
                # FAILED_PRECONDITION: the interaction is not running any more.
                return False
            raise UpstreamFailed(
                f"upstream_http_{exc.status_code}", f"cancelling the interaction failed with HTTP {exc.status_code}"
            ) from None
        except sdk_errors.APIConnectionError:
            raise UpstreamFailed("upstream_unreachable", "the model service could not be reached") from None
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


class _ChainLost(Exception):
    """The provider no longer has the interaction a chained request named."""

    def __init__(self, attempts: int) -> None:
        super().__init__("the previous interaction is gone")
        self.attempts = attempts


def _chain_gone(exc: sdk_errors.APIStatusError) -> bool:
    """Whether a refused chained create says its previous interaction is gone: 404 or 410, or a
    400 whose message names `previous_interaction_id` (how the provider reports an unknown or
    expired id is not documented, so both shapes count). The message is only looked at, never
    kept: it may quote the request."""
    if exc.status_code in {404, 410}:
        return True
    if exc.status_code != 400:
        return False
    body = exc.body
    error = body.get("error") if isinstance(body, dict) else None
    message = error.get("message") if isinstance(error, dict) else body
    return isinstance(message, str) and "previous_interaction" in message


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
    if isinstance(exc, _NOT_JSON):
        return "bad_response"
    return "cancelled" if isinstance(exc, asyncio.CancelledError) else "error"


def _event_step(assembler: StepAssembler, event: dict[str, Any]) -> dict[str, Any] | None:
    """The step a step event belongs to, as assembled so far."""
    index = event.get("index")
    if event.get("event_type", "").startswith("step.") and isinstance(index, int) and 0 <= index < len(assembler.steps):
        return assembler.steps[index].value
    return None


def _hop_ids(hops: list[_Hop]) -> list[str]:
    """The interaction ids of the hops, when they are plausible ids: they go into the ledger and
    audit records, which must never hold arbitrary text from a response."""
    ids = (hop.get("id") for hop, _ in hops)
    return [i for i in ids if isinstance(i, str) and _INTERACTION_ID.fullmatch(i)]


def _merge(hops: list[_Hop]) -> _Hop:
    """One reply from a turn's hops, as the SDK merges them: steps in order (a continuation's
    leading user_input, the turn's input again, dropped), usage summed, the rest from the last.
    The step bytes are merged the same way, so they stay aligned with the parsed steps."""
    if len(hops) == 1:
        return hops[0]
    merged = dict(hops[-1][0])
    steps: list[Any] = []
    raw: list[bytes] = []
    usage: dict[str, int] = {}
    for index, (hop, hop_raw) in enumerate(hops):
        hop_steps = list(hop.get("steps") or [])
        if index and hop_steps and isinstance(hop_steps[0], dict) and hop_steps[0].get("type") == "user_input":
            hop_steps, hop_raw = hop_steps[1:], hop_raw[1:]
        steps.extend(hop_steps)
        raw.extend(hop_raw)
        for name, value in (hop.get("usage") or {}).items():
            if isinstance(value, int) and not isinstance(value, bool):
                usage[name] = usage.get(name, 0) + value
    merged["steps"] = steps
    merged["usage"] = usage
    return merged, raw


def _request_body(settings: dict[str, Any], store: bool, fields: dict[str, Any], input_array: bytes | None) -> bytes:
    """A create request's JSON body: the route's settings, `store` and `fields` serialized here
    (a handful of small values), then `input_array`, the steps' own bytes, spliced in as it is.
    Later keys win over earlier ones, as `extra_body` won over the typed arguments."""
    head = json.dumps(
        {**settings, "store": store, **fields}, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    ).encode()
    if input_array is None:
        return head
    # `head` is a JSON object with at least `store` in it: `input` goes in before its closing brace.
    return b"".join((head[:-1], b',"input":', input_array, b"}"))


def _sdk_create_sender(client: genai.Client) -> Callable[[bytes, float | None], Awaitable[bytes]]:
    """`send(body, timeout_seconds)`: POST a create whose JSON body is already bytes, as the SDK's
    typed `interactions.create` would send it (with the configured timeout, or a shorter one
    given); the response body, or the SDK's error classes.

    The SDK (google-genai 3.x, a generated client) has no public way to send a body it did not
    serialize itself, so this reaches into its generated interactions resource, and only here:
    `_build_request_async` builds the request exactly as the typed `create` does (server URL,
    `/{api_version}/interactions` with Vertex AI's `projects/{p}/locations/{l}` in the version,
    the default headers with Api-Revision and the SDK's user-agent and x-goog-api-client, the API
    key or the Vertex AI access token, the configured timeout); the SDK's own before-request
    hooks then apply its auth and quota-project headers, and its HTTP client (httpx2 or httpx,
    whichever the SDK chose) sends it. Left out is what costs without changing the wire: the
    typed `create` runs those hooks in a worker thread, and renders the whole body for a debug
    log even when that log is off (and would write the conversation into it when on).

    Errors come back as the typed path raises them: transport failures through the SDK's own
    translation (APITimeoutError, APIConnectionError), a 4xx/5xx as the APIStatusError subclass
    of its status. Everything private is looked up now, when the Upstream is made, so an SDK
    that changed under us fails at startup rather than on a turn; tests/test_upstream_wire.py
    compares what this sends with what the typed `create` sends.
    """
    try:
        from google.genai._gaos._hooks import BeforeRequestContext, HookContext, ResponseContext
        from google.genai._gaos.lib.compat_errors import wrap_sdk_error
        from google.genai._gaos.models import CreateInteractionGlobals
        from google.genai._gaos.types import Security
        from google.genai._gaos.utils import SerializedRequestBody, get_security_from_env, template_url

        resource = client.aio.interactions
        config = resource.sdk_configuration
        build_request = resource._build_request_async
        hooks = config.__dict__["_hooks"]
        http = config.async_client
        path_globals = CreateInteractionGlobals(api_version=config.globals.api_version)
        base_url = template_url(*config.get_server_details())
        timeout_ms = config.timeout_ms
    except (ImportError, AttributeError, KeyError) as exc:
        raise ConfigurationError(
            f"this google-genai version is not one Custody can send raw request bodies through: {exc!r}"
        ) from exc
    if http is None:
        raise ConfigurationError("the google-genai client has no async HTTP client")

    async def send(body: bytes, timeout_seconds: float | None = None) -> bytes:
        # Arguments as the generated `AsyncInteractions.create` passes them (stream=False).
        request = build_request(
            method="POST",
            path="/{api_version}/interactions",
            base_url=base_url,
            url_variables=None,
            request=None,
            request_body_required=True,
            request_has_path_params=True,
            request_has_query_params=True,
            user_agent_header="user-agent",
            accept_header_value="application/json",
            http_headers=None,
            extra_query_params=None,
            _globals=path_globals,
            security=config.security,
            get_serialized_body=lambda: SerializedRequestBody("application/json", content=body),
            allow_empty_value=None,
            timeout_ms=timeout_ms if timeout_seconds is None else max(1, int(timeout_seconds * 1000)),
        )
        context = HookContext(
            config=config,
            base_url=base_url or "",
            operation_id="CreateInteraction",
            oauth2_scopes=None,
            security_source=get_security_from_env(config.security, Security),
            tags=["interactions"],
            extensions=None,
            response=ResponseContext(mode="raw", execution="async"),
        )
        try:
            request = hooks.before_request(BeforeRequestContext(context), request)
            response = await http.send(request)
        except Exception as exc:
            # The SDK's own translation of whatever its HTTP client raised (its after-error hook).
            translated = wrap_sdk_error(exc)
            if translated is exc:
                raise
            raise translated from exc
        if 400 <= response.status_code < 600:
            raise sdk_errors.APIError.generate(
                status_code=response.status_code, body=_error_body(response), message=None, response=response
            )
        content: bytes = response.content
        return content

    return send


def _error_body(response: Any) -> Any:
    """An error response's body as the SDK keeps it on its errors: JSON when it parses, else text."""
    try:
        return json.loads(response.content)
    except (ValueError, RecursionError):
        return response.text


def _backoff(attempt: int) -> float:
    """Full jitter: anywhere from nothing to the exponential step, so that clients who failed
    together do not come back together."""
    step: float = min(0.25 * 2.0 ** (attempt - 1), 4.0)
    return random.uniform(0.0, step)  # noqa: S311 - jitter that spreads retries, not a secret


def _retry_after(headers: Any) -> float | None:
    """How long the service asked us to wait: `retry-after-ms`, or `Retry-After` in seconds or as
    an HTTP date; None when it did not say (or said something unreadable)."""
    milliseconds = headers.get("retry-after-ms")
    if milliseconds:
        try:
            return max(float(milliseconds) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when.tzinfo is None:  # an HTTP date is GMT, whether or not it says so
        when = when.replace(tzinfo=UTC)
    return max((when - datetime.now(UTC)).total_seconds(), 0.0)


def _in_time(deadline: float | None, wait: float) -> bool:
    """Whether a retry after `wait` seconds would still start before the deadline."""
    return deadline is None or time.monotonic() + wait < deadline


def _deadline_passed(attempts: int) -> UpstreamFailed:
    return UpstreamFailed(
        "upstream_deadline", "the turn's deadline passed before the model answered", timeout=True, attempts=attempts
    )
