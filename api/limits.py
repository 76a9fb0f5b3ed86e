"""The request body limit, enforced before any body is read.

A request that declares a ``Content-Length`` over the limit gets 413 at once, before
authentication and without a byte of its body read. A body sent without a length (chunked)
is counted as the application reads it, and reading past the limit raises :class:`BodyTooLarge`
(413). Routes check credentials before they read a body, so a client without them never gets
one read at all. A response sent while the request's body is still unread closes the
connection, so the server does not go on receiving (and discarding) what the client sends.
"""

from __future__ import annotations

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.problems import problem

# The one route that takes a body, the balloon request, needs under 100 bytes
# ({"target_bytes": <20 digits>, "force": false}). 1 KiB leaves room for whitespace and a few
# later fields, and bounds what any client, with credentials or without, makes the daemon hold.
MAX_BODY_BYTES = 1024
_CLOSE = (b"connection", b"close")


class BodyTooLarge(HTTPException):
    """The request's body is over :data:`MAX_BODY_BYTES` (an HTTPException, so FastAPI passes it
    through its body parsing to the problem handler unchanged)."""

    def __init__(self, limit: int) -> None:
        super().__init__(413, f"the request body is over the limit of {limit} bytes")


class BodyLimit:
    """ASGI middleware: refuse bodies over ``max_bytes`` before reading them."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_BODY_BYTES) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = dict(scope["headers"])
        # h11 has checked the framing: a Content-Length is digits (one value); no length and no
        # chunked coding means no body.
        length = headers.get(b"content-length")
        chunked = b"chunked" in headers.get(b"transfer-encoding", b"").lower()
        declared = int(length) if length is not None else None
        body_read = not chunked and not declared
        received = 0

        async def counted_receive() -> Message:
            nonlocal received, body_read
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge(self.max_bytes)
                body_read = not message.get("more_body", False)
            return message

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_read:
                message = {**message, "headers": [*message.get("headers", ()), _CLOSE]}
            await send(message)

        if declared is not None and declared > self.max_bytes:
            response = problem(
                413,
                f"the request body ({declared} bytes) is over the limit of {self.max_bytes}",
                instance=scope["path"],
            )
            await response(scope, receive, closing_send)
            return
        await self.app(scope, counted_receive, closing_send)
