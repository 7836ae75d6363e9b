"""structlog, configured once for the API, the workers and the CLI.

One stdlib handler whose `ProcessorFormatter` renders both structlog events and plain stdlib
records (uvicorn, Celery, botocore), so every line has the same shape and carries the context
bound with `structlog.contextvars`.
"""

from __future__ import annotations

import logging
import re
import sys
from collections.abc import MutableMapping
from typing import Any

import structlog
from celery.app import trace

from config.tracing import log_ids

# Keys whose values must never reach a log line, whatever code bound them: any key whose
# name (in lower case, at any depth of nested dicts) contains one of these.
_SECRET_KEY_PARTS = (
    "secret", "password", "api_key", "apikey", "authorization", "token", "cookie", "credential",
)  # fmt: skip
# Query parameters that make a URL a credential: S3 presigned URLs (v4 and v2), CloudFront
# signed URLs, and generic tokens. A URL carrying one loses its whole query string.
_SIGNING_PARAMS = frozenset(
    {
        "x-amz-signature", "x-amz-credential", "x-amz-security-token", "signature",
        "awsaccesskeyid", "key-pair-id", "policy", "token", "access_token", "sig", "api_key",
    }
)  # fmt: skip
# Any scheme: database and broker URLs carry passwords as often as http ones do.
_URL = re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s'\"<>]+")
_BEARER = re.compile(r"\b(Bearer|Basic)\s+[A-Za-z0-9._~+/=-]+")
# A path segment that is a credential: receivers' URLs often are one (Slack's
# /services/T000/B000/<token>, Discord's /api/webhooks/<id>/<token>, Telegram's /bot<token>/).
# Long runs of token characters with a capital or a digit; UUIDs and hex ids (jobs,
# predictions, digests) stay readable, and so do words, which are lower case.
_TOKEN = re.compile(r"[A-Za-z0-9_:-]{16,}")
_READABLE_ID = re.compile(r"[0-9a-fA-F-]+")
_TOKEN_MARK = re.compile(r"[A-Z0-9]")
REDACTED = "[redacted]"


def scrub(text: str) -> str:
    """`text` without credentials: URLs lose their userinfo, secret-looking path segments and
    signed query strings; bearer tokens lose their value."""
    return _BEARER.sub(rf"\1 {REDACTED}", _URL.sub(_scrub_url, text))


def _scrub_url(match: re.Match[str]) -> str:
    scheme, _, rest = match.group(0).partition("://")
    rest, mark, query = rest.partition("?")
    authority, slash, path = rest.partition("/")
    if "@" in authority:
        authority = f"{REDACTED}@{authority.rpartition('@')[2]}"
    path = "/".join(REDACTED if _token(segment) else segment for segment in path.split("/"))
    return f"{scheme}://{authority}{slash}{path}{mark}{_scrub_query(query)}"


def _token(segment: str) -> bool:
    return bool(
        _TOKEN.fullmatch(segment)
        and not _READABLE_ID.fullmatch(segment)
        and _TOKEN_MARK.search(segment)
    )


def _scrub_query(query: str) -> str:
    keys = {pair.partition("=")[0].lower() for pair in query.split("&")}
    return REDACTED if keys & _SIGNING_PARAMS else query


def _secret_key(name: object) -> bool:
    lowered = str(name).lower()
    return any(part in lowered for part in _SECRET_KEY_PARTS)


def _clean(value: Any) -> Any:
    if isinstance(value, str):
        return scrub(value)
    if isinstance(value, dict):
        return {k: REDACTED if _secret_key(k) else _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    if type(value) is tuple:  # exc_info tuples must stay tuples
        return tuple(_clean(v) for v in value)
    return value


def _redact(_: Any, __: str, event_dict: MutableMapping[str, Any]) -> dict[str, Any]:
    return {
        key: REDACTED if _secret_key(key) else _clean(value) for key, value in event_dict.items()
    }


def _every_task(record: logging.LogRecord) -> bool:
    """Leaves out Celery's two lines for every task it runs (received, succeeded): hundreds a
    second at volume, about a twentieth of the worker's CPU to render, and nothing the job's
    own events do not say. Its other lines (a retry, a failure) stay; DEBUG keeps these too."""
    return record.msg not in (trace.LOG_RECEIVED, trace.LOG_SUCCESS)


def configure_logging(log_format: str = "json", level: str = "INFO") -> None:
    """Route structlog and stdlib logging through one handler; safe to call more than once."""
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        log_ids,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    # A line is scrubbed once, just before it is rendered, and after its traceback became
    # text: the console's too, which would otherwise render it after the scrubbing (with
    # rich's local variables, a key about to be sent among them). The console then prints
    # that text as it is; `plain_traceback` says so (some structlog versions warn otherwise).
    renderer: Any = (
        structlog.dev.ConsoleRenderer(
            colors=sys.stderr.isatty(), exception_formatter=structlog.dev.plain_traceback
        )
        if log_format == "console"
        else structlog.processors.JSONRenderer()
    )
    structlog.configure(
        processors=[*shared, structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=True,
    )
    handler = logging.StreamHandler()
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=shared,
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                structlog.processors.format_exc_info,
                _redact,
                renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(level.upper())
    # botocore and httpx are chatty at INFO and may echo presigned query strings.
    for noisy in ("botocore", "boto3", "urllib3", "httpx", "httpcore", "s3transfer"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    for per_task in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(per_task).removeFilter(_every_task)
        if root.level > logging.DEBUG:
            logging.getLogger(per_task).addFilter(_every_task)
