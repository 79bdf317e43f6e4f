"""The platform API under /v1: thin handlers over worker.service."""

from __future__ import annotations

import json
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Depends, Path, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import JSONResponse

from ..errors import AlreadySettled, Conflict, InvalidInput, NotFound
from ..ingest import Transaction
from ..service import Remind
from .schemas import ERRORS, CancelRequest, ErasureView, ErrorBody, RegisteredView, TransactionView
from .security import check_scope

#: The request body's schema: the ingest model itself, its nested models published as components.
TRANSACTION_SCHEMA = Transaction.model_json_schema(ref_template="#/components/schemas/{model}")
TRANSACTION_DEFS = TRANSACTION_SCHEMA.pop("$defs", {})

FORBIDDEN = {"model": ErrorBody, "description": "A valid token of another scope (ops, metrics)"}

TxId = Annotated[str, Path(min_length=1, max_length=64, description="The platform's transaction id")]


def error(http_status: int, code: str, detail: str, **extra) -> JSONResponse:
    body = {"error": code, "detail": detail, **{k: v for k, v in extra.items() if v is not None}}
    return JSONResponse(body, status_code=http_status)


def router(remind: Remind) -> APIRouter:
    def auth(request: Request) -> None:
        check_scope(request, "platform", remind.settings.token_lists)

    api = APIRouter(prefix="/v1", dependencies=[Depends(auth)],
                    responses={400: ERRORS[400], 401: ERRORS[401], 403: FORBIDDEN, 413: ERRORS[413], 422: ERRORS[422]})

    async def view(tx_id: str) -> dict:
        return await run_in_threadpool(remind.show, tx_id)

    @api.post(
        "/transactions", status_code=201, response_model=RegisteredView,
        summary="Register a pending transaction",
        responses={200: {"model": RegisteredView, "description": "The same transaction was registered before"},
                   400: ERRORS[400], 409: {"model": ErrorBody, "description": "Same id, different content"},
                   413: ERRORS[413], 422: ERRORS[422]},
        openapi_extra={"requestBody": {"required": True, "content": {"application/json": {
            "schema": TRANSACTION_SCHEMA}}}},
    )
    async def register(request: Request):
        try:
            payload = json.loads(await request.body(), parse_float=Decimal)
        except (ValueError, UnicodeDecodeError, RecursionError) as exc:
            return error(400, "bad_json", f"the body is not valid JSON: {type(exc).__name__}")
        if not isinstance(payload, dict):
            return error(422, "invalid", "the body must be a JSON object", problems={"(body)": "not an object"})
        def register_and_show() -> tuple[bool, dict]:  # one hop to the thread pool, not two
            reg = remind.register(payload)
            view = {**remind.show(reg.transaction_id), "locale": reg.locale}
            if reg.locale_requested is not None:  # no templates in the customer's language: say so
                view["locale_requested"] = reg.locale_requested
            return reg.created, view

        try:
            created, body = await run_in_threadpool(register_and_show)
        except InvalidInput as exc:
            return error(422, "invalid", "some fields are invalid", problems=exc.problems)
        except Conflict as exc:
            return error(409, "conflict", str(exc), fields=exc.fields)
        return JSONResponse(body, status_code=201 if created else 200)

    @api.get("/transactions/{tx_id}", response_model=TransactionView, responses={404: ERRORS[404]},
             summary="Status and timeline")
    async def show(tx_id: TxId):
        try:
            return JSONResponse(await view(tx_id))
        except NotFound as exc:
            return error(404, "not_found", str(exc))

    @api.post("/transactions/{tx_id}/confirm", response_model=TransactionView,
              responses={404: ERRORS[404], 409: {"model": ErrorBody, "description": "Already cancelled"}},
              summary="Confirm: no more reminders (repeating is fine)")
    async def confirm(tx_id: TxId):
        try:
            await run_in_threadpool(remind.confirm, tx_id)
        except NotFound as exc:
            return error(404, "not_found", str(exc))
        except AlreadySettled as exc:
            return error(409, "already_settled", f"{exc}; it cannot be confirmed", status=exc.status)
        return JSONResponse(await view(tx_id))

    @api.post("/transactions/{tx_id}/cancel", response_model=TransactionView,
              responses={404: ERRORS[404], 409: {"model": ErrorBody, "description": "Already confirmed"},
                         422: ERRORS[422]},
              summary="Cancel on the platform's side: no more reminders")
    async def cancel(tx_id: TxId, body: CancelRequest):
        try:
            await run_in_threadpool(remind.cancel, tx_id, body.reason)
        except NotFound as exc:
            return error(404, "not_found", str(exc))
        except AlreadySettled as exc:
            return error(409, "already_settled", f"{exc}; it cannot be cancelled", status=exc.status)
        return JSONResponse(await view(tx_id))

    # ``:path``: a customer id is any line of text, "/" included, and each must be erasable here.
    @api.delete("/customers/{customer_id:path}/personal-data", response_model=ErasureView,
                responses={404: {"model": ErrorBody, "description": "An id with a line break matches no route"},
                           422: ERRORS[422]},
                summary="Erase a customer's name, phone, email and push tokens (repeating is fine)")
    async def erase(customer_id: str):
        try:
            result = await run_in_threadpool(remind.erase_customer, customer_id)
        except InvalidInput as exc:
            return error(422, "invalid", "some fields are invalid", problems=exc.problems)
        return JSONResponse({"customer_id": customer_id, "transactions": result.transactions,
                             "erased": result.erased, "cancelled": result.cancelled})

    return api
