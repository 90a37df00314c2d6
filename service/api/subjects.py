"""`/v1/subjects`: a backend erases a data subject (GDPR Art. 17) from its tenant.

The path holds the subject's identifier, which is client text: it is turned into its keyed digest
and nothing else. It never reaches a log line (the service logs no paths; uvicorn's access log is
off), a span (the server span is named by the route template, `/v1/subjects/{subject}`), an audit
record or an error body.
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Annotated, Any

from litestar import Controller, Request, delete
from litestar.di import NamedDependency, Provide
from litestar.params import PathParameter

from ..audit import RequestMeta
from ..auth import Principal
from ..context import ServiceContext
from ..conversations import erase_subject
from .security import provide_meta, require_role
from .wire import AUTHENTICATED, ApiOperation, DeletionReceiptOut, problem_responses

__all__ = ["SubjectController"]


def _ctx(request: Request[Any, Any, Any]) -> ServiceContext:
    ctx: ServiceContext = request.app.state.ctx
    return ctx


class SubjectController(Controller):
    path = "/v1/subjects"
    # Immutable class attributes: Litestar copies them into each router it registers the controller on.
    # Tagged with the conversations: it is the backend's, and erases conversations.
    tags = ("conversations",)
    dependencies = MappingProxyType({"principal": Provide(require_role("backend")), "meta": Provide(provide_meta)})
    security = ({"bearerAuth": []},)

    @delete(
        "/{subject:str}",
        operation_id="EraseSubject",
        status_code=200,
        summary="Erase a data subject",
        operation_class=ApiOperation,
        responses=problem_responses(
            *AUTHENTICATED,
            notes={
                404: "No operation answers this path: an identifier holding `/` (even encoded, `%2F`) cannot be "
                "named in a path.",
            },
        ),
    )
    async def erase(
        self,
        request: Request[Any, Any, Any],
        subject: Annotated[
            str,
            PathParameter(
                description="The data subject's identifier, as the conversations were opened with it (`subject`); "
                "only its keyed digest is used, and it is never logged or recorded.",
                min_length=1,
            ),
        ],
        principal: NamedDependency[Principal],
        meta: NamedDependency[RequestMeta],
    ) -> DeletionReceiptOut:
        """Erase every conversation of the data subject in the caller's tenant, as a deletion does
        (data key first, then rows, then any provider copies), and answer with one receipt, signed
        with the audit key, that covers them all.

        Conversations that must stay are kept and listed in the receipt's `kept`, each with its
        reason: `legal_hold` (with the `hold_id`), `minimum_retention` (with `deletable_from`) or
        `turn_in_progress` (erase again when the turn ends). A subject with no conversations gets a
        receipt that lists none. Each erased conversation has its own `conversation.delete` audit
        record, and the erasure a `subject.erase` record with the counts; neither names the subject.
        """
        deleted = await erase_subject(_ctx(request), principal, meta, subject)
        return DeletionReceiptOut.of(deleted.receipt)
