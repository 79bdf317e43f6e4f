"""The API's documented shapes (OpenAPI); responses are validated against them."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field

from ..ingest import Line

#: A query value with no control characters (they would end up in logs and SQL parameters).
NO_CONTROL = r"^[^\x00-\x1f\x7f]+$"
ScheduleName = Annotated[str | None, Query(min_length=1, max_length=64, pattern=NO_CONTROL,
                                           description="Only this schedule")]

Status = Literal["pending", "confirmed", "cancelled", "escalated"]


class TimelineEntry(BaseModel):
    step: str
    kind: str = Field(description="reminder, notice (cancel/escalate message) or webhook")
    channel: str
    template: str | None
    variant: str
    due_at: str | None
    sent_at: str | None
    status: Literal["planned", "sent", "delivered", "failed", "skipped"]
    state: str = Field(description="the delivery's internal state (queued, sending, ...)")
    attempts: int
    reason: str | None
    recipient: str | None = Field(description="masked")


class TransactionView(BaseModel):
    """The transaction as registered, its status and its timeline."""

    model_config = ConfigDict(extra="allow")
    id: str
    status: Status
    status_reason: str | None
    schedule: str
    schedule_version: str
    deadline: str
    confirmed_at: str | None
    cancelled_at: str | None
    escalated_at: str | None
    erased_at: str | None = Field(None, description="when the customer's personal data was erased")
    timeline: list[TimelineEntry]


class RegisteredView(TransactionView):
    """The registered transaction, and the language its customer's messages are written in."""

    locale: str = Field(description="the template locale used for this customer's messages (e.g. en, zh-TW)")
    locale_requested: str | None = Field(None, description="only when customer.locale has no templates in its "
                                         "language: that tag (messages then use `locale`, the fallback)")


class ErasureView(BaseModel):
    """The customer's transactions no longer hold a name, phone, email or push token. The same answer
    for a customer erased before (``erased`` and ``cancelled`` then empty) or never seen (all zero)."""

    customer_id: str
    transactions: int = Field(description="the customer's transactions, none holding personal data now")
    erased: list[str] = Field(description="ids erased by this call")
    cancelled: list[str] = Field(description="ids that were pending: cancelled (customer_request) by this call")


class CancelRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: Line = Field(min_length=1, max_length=500)  # one line of text: no NUL or control characters


class ErrorBody(BaseModel):
    error: str
    detail: str
    problems: dict[str, str] | None = None
    fields: list[str] | None = None
    status: str | None = None


ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorBody, "description": "Not JSON"},
    401: {"model": ErrorBody, "description": "Missing or wrong bearer token"},
    404: {"model": ErrorBody, "description": "No such transaction"},
    413: {"model": ErrorBody, "description": "Body too large"},
    422: {"model": ErrorBody, "description": "Invalid fields, each named in `problems`"},
}
