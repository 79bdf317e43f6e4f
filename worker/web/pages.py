"""The one-tap confirmation page. GET only shows; only the button's POST confirms, because mail
scanners and link previews fetch GET links and must never confirm a payment."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from fastapi import APIRouter, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.responses import HTMLResponse
from jinja2 import Environment, FileSystemLoader, select_autoescape

from ..errors import AlreadySettled, NotFound
from ..links import InvalidToken, read_token
from ..render import facts_for, negotiate_tag
from ..service import Remind

_ENV = Environment(loader=FileSystemLoader(str(Path(__file__).parent)), autoescape=select_autoescape(["html"]))

TEXT = {
    "en": {
        "lang": "en", "amount": "Amount", "fee": "Fee", "total": "Total", "method": "Payment method",
        "arrival": "Expected arrival", "deadline": "Confirm before", "button": "Confirm this transfer",
        "safety": "Only confirm a transfer you started yourself.",
        "review": "Please check your transfer", "review_line": "Hi {name}, confirm the transfer below to send it.",
        "done": "Transfer confirmed", "done_line": "Thank you, {name}. We are sending {total} now; it should "
        "arrive around {arrival}. You will be notified when it does.",
        "already": "Already confirmed", "already_line": "This transfer was confirmed before; nothing more to do.",
        "cancelled": "This transfer was cancelled", "cancelled_line": "{reason} No money was moved. To send money, "
        "start a new transfer in the app.",
        "escalated": "This transfer is under review", "escalated_line": "We are checking this transfer for your "
        "security. Our team will contact you; no money has moved yet.",
        "invalid": "This link is not valid", "invalid_line": "Please open the latest message we sent you, or "
        "open the app.",
        "expired": "This link has expired", "expired_line": "The time to confirm this transfer has passed. "
        "Start a new transfer in the app if you still want to send money.",
        "unavailable": "Please try again in a minute", "unavailable_line": "We cannot reach our records right "
        "now. Nothing has changed: open this link again in a minute, or press the button again.",
    },
    "zh-CN": {
        "lang": "zh-CN", "amount": "金额", "fee": "手续费", "total": "合计", "method": "付款方式",
        "arrival": "预计到账", "deadline": "请在此时间前确认", "button": "确认这笔转账",
        "safety": "请只确认您本人发起的转账。",
        "review": "请核对您的转账", "review_line": "{name}，您好！请核对以下信息并确认转账。",
        "done": "转账已确认",
        "done_line": "谢谢您，{name}。我们正在转出 {total}，预计 {arrival} 到账，到账后会通知您。",
        "already": "已确认", "already_line": "这笔转账此前已确认，无需再操作。",
        "cancelled": "这笔转账已取消", "cancelled_line": "{reason}资金未被划转。如需转账，请在 App 中重新发起。",
        "escalated": "这笔转账正在审核",
        "escalated_line": "为保障您的资金安全，这笔转账正在审核中，我们的团队会与您联系。资金尚未划转。",
        "invalid": "链接无效",
        "invalid_line": "请打开我们最新发送给您的消息，或直接打开 App。",
        "expired": "链接已过期",
        "expired_line": "确认时间已过。如仍需转账，请在 App 中重新发起。",
        "unavailable": "请一分钟后再试",
        "unavailable_line": "系统暂时无法处理您的请求，转账状态没有任何变化。请一分钟后重新打开此链接或再次点击按钮。",
    },
    "zh-TW": {
        "lang": "zh-TW", "amount": "轉帳金額", "fee": "手續費", "total": "合計金額", "method": "付款方式",
        "arrival": "預計入帳", "deadline": "確認期限", "button": "確認這筆轉帳",
        "safety": "請只確認您本人申請的轉帳。",
        "review": "請核對您的轉帳", "review_line": "{name} 您好：請核對以下資訊後確認轉帳。",
        "done": "轉帳已確認",
        "done_line": "謝謝您，{name}。我們正在轉出 {total}，預計 {arrival} 入帳，入帳後會通知您。",
        "already": "已確認", "already_line": "這筆轉帳先前已確認，不需要再做任何動作。",
        "cancelled": "這筆轉帳已取消", "cancelled_line": "{reason}款項並未轉出。如需轉帳，請在 App 中重新申請。",
        "escalated": "這筆轉帳正在審核中",
        "escalated_line": "為保障您的資金安全，這筆轉帳正在審核中，我們的團隊會與您聯絡。款項尚未轉出。",
        "invalid": "連結無效",
        "invalid_line": "請開啟我們最新傳送給您的訊息，或直接開啟 App。",
        "expired": "連結已過期",
        "expired_line": "確認期限已過。如仍需轉帳，請在 App 中重新申請。",
        "unavailable": "請一分鐘後再試",
        "unavailable_line": "系統暫時無法處理您的要求，轉帳狀態沒有任何變更。"
        "請一分鐘後重新開啟此連結，或再按一次按鈕。",
    },
}


def _text(locale: str) -> dict[str, str]:
    """The page's words for a template locale (see ``Templates.negotiate``); English for one without them."""
    return TEXT.get(locale, TEXT["en"])


def _page(t: dict[str, str], title_key: str, line_key: str, status: int, *, facts=None, form=False,
          tone: str = "ok", **fmt) -> HTMLResponse:
    html = _ENV.get_template("page.html").render(
        lang=t["lang"], t=t, title=t[title_key], lines=[t[line_key].format(**fmt)], facts=facts, form=form,
        tone=tone)
    return HTMLResponse(html, status_code=status)


def _request_text(request: Request) -> dict[str, str]:
    """Before the transaction is known (a bad link, an outage): the browser's languages, best first."""
    tags = []
    for item in request.headers.get("accept-language", "").split(","):
        tag, _, q = item.strip().partition(";q=")
        try:
            weight = float(q) if q else 1.0
        except ValueError:
            continue
        if tag and tag != "*" and weight > 0:
            tags.append((-weight, len(tags), tag))
    for _, _, tag in sorted(tags)[:8]:
        found = negotiate_tag(tag, tuple(TEXT))
        if found:
            return TEXT[found]
    return TEXT["en"]


def outage_page(request: Request, headers: dict[str, str]) -> HTMLResponse:
    """The page for a link opened (or a button pressed) while the database is down: 503, try again in a
    minute. Confirming twice is harmless, so pressing the button again later is the whole recovery."""
    page = _page(_request_text(request), "unavailable", "unavailable_line", 503, tone="bad")
    page.headers.update(headers)
    return page


def answering_review(view: dict) -> bool:
    """Ops asked the customer to verify this escalated transfer: the link may confirm it now."""
    return view["status"] == "escalated" and view.get("review_state") == "contacted"


def router(remind: Remind) -> APIRouter:
    pages = APIRouter(include_in_schema=False)

    def load(token: str, request: Request):
        try:
            tx_id = read_token(remind.settings.secret_key, token, now=remind.store.clock())
            view = remind.show(tx_id)
        except InvalidToken as exc:
            key = "expired" if exc.expired else "invalid"
            return None, _page(_request_text(request), key, f"{key}_line", 410 if exc.expired else 400, tone="bad")
        except NotFound:
            return None, _page(_request_text(request), "invalid", "invalid_line", 404, tone="bad")
        return view, None

    def page_locale(view: dict) -> str:
        """The customer's template locale when the page speaks it (the messages' language), else en."""
        locale = remind.templates.negotiate(view["customer"].get("locale"))
        return locale if locale in TEXT else "en"

    def customer_text(view: dict) -> dict[str, str]:
        return _text(page_locale(view))

    def facts(view: dict) -> dict:
        return facts_for(view, templates=remind.templates, locale=page_locale(view), now=remind.store.clock(),
                         deadline=datetime.fromisoformat(view["deadline"]), confirm_url="", restart_url="",
                         step="page", reason=view.get("status_reason") or "")

    def settled_page(view: dict, t: dict[str, str]) -> HTMLResponse:
        status = view["status"]
        if status == "confirmed":
            return _page(t, "already", "already_line", 200, facts=facts(view))
        if status == "escalated":
            return _page(t, "escalated", "escalated_line", 409, tone="bad")
        return _page(t, "cancelled", "cancelled_line", 409, tone="bad", reason=facts(view)["reason_text"])

    @pages.get("/c/{token}", response_class=HTMLResponse)
    async def show(token: str, request: Request):
        view, page = await run_in_threadpool(load, token, request)
        if page:
            return page
        t = customer_text(view)
        if view["status"] != "pending" and not answering_review(view):
            return settled_page(view, t)
        f = facts(view)
        return _page(t, "review", "review_line", 200, facts=f, form=True, name=view["customer"]["name"])

    @pages.post("/c/{token}", response_class=HTMLResponse)
    async def confirm(token: str, request: Request):
        view, page = await run_in_threadpool(load, token, request)
        if page:
            return page
        t = customer_text(view)
        if view["status"] == "confirmed":
            return settled_page(view, t)
        try:
            await run_in_threadpool(lambda: remind.confirm(view["id"], by_customer=True))
        except AlreadySettled:
            return settled_page(await run_in_threadpool(remind.show, view["id"]), t)
        f = facts(view)
        return _page(t, "done", "done_line", 200, facts=f, name=view["customer"]["name"], total=f["total"],
                     arrival=f["arrival"])

    return pages
