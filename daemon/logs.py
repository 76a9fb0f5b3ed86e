"""The daemon's one log format: text lines, or JSON objects one a line for log collectors.

Everything logs through the root logger's handler, uvicorn included (it is given no handlers
of its own), so ``--log-format`` decides every line.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from typing import Final, Literal

LogFormat = Literal["text", "json"]
FORMATS: Final = ("text", "json")
TEXT_FORMAT: Final = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class JSONFormatter(logging.Formatter):
    """``{"time", "level", "logger", "message"[, "exception"]}``: time in RFC 3339 UTC."""

    def format(self, record: logging.LogRecord) -> str:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
        body = {
            "time": f"{stamp}.{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        if record.exc_info:
            body["exception"] = self.formatException(record.exc_info)
        return json.dumps(body, ensure_ascii=False)


def configure(log_format: LogFormat = "text", *, verbose: bool = False) -> None:
    """Log to stderr in ``log_format`` at INFO (DEBUG when ``verbose``)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(
        JSONFormatter() if log_format == "json" else logging.Formatter(TEXT_FORMAT)
    )
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, handlers=[handler])
    # qemu.qmp logs every failed connection at ERROR; sessions record causes themselves.
    logging.getLogger("qemu.qmp").setLevel(logging.CRITICAL)
