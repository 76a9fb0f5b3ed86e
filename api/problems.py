"""Error responses: RFC 9457 problem details, one format for every error the API answers with.

Every 4xx and 5xx body is ``application/problem+json`` with ``type``, ``title``, ``status``,
``detail`` and ``instance``; a 422 adds ``errors``, one entry per invalid input. ``type`` is
``about:blank`` (RFC 9457 section 4.2.1): the status says what kind of problem it is, and
``title`` is the status's phrase. Routes declare the errors they answer with through
:func:`problems`; :func:`document` adds the ones any operation may answer with (413, 500 and,
with read authentication, 401) and puts the schemas into the OpenAPI document.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from http import HTTPStatus
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.openapi.utils import get_openapi
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

PROBLEM_JSON = "application/problem+json"
# A detail is read by people; anything longer is an echo of input or a runaway error text.
MAX_DETAIL_CHARS = 1000
MAX_VALIDATION_ISSUES = 20
_SCHEMA_REF = "#/components/schemas/{model}"


class Problem(BaseModel):
    """An error (RFC 9457 problem details)."""

    # Every member is always sent, ``type`` too: the document says so (required).
    model_config = ConfigDict(extra="forbid", json_schema_serialization_defaults_required=True)

    type: str = Field(default="about:blank", description="URI of the problem type")
    title: str = Field(description="the HTTP status's phrase")
    status: int = Field(ge=400, le=599, description="the HTTP status code")
    detail: str = Field(description="what went wrong with this request, for people")
    instance: str = Field(description="the path of the request")


class ValidationIssue(BaseModel):
    model_config = ConfigDict(extra="forbid")

    loc: list[str] = Field(description="where: path, query or body, then the field")
    msg: str
    type: str = Field(description="pydantic's error type, e.g. int_type or less_than_equal")


class ValidationProblem(Problem):
    """A request whose parameters or body are invalid (422)."""

    errors: list[ValidationIssue] = Field(description="each invalid input, at most 20")


def readable(text: object, limit: int = MAX_DETAIL_CHARS) -> str:
    """``text`` as a bounded string that encodes as UTF-8 (lone surrogates escaped)."""
    value = str(text)
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def problem(
    status: int,
    detail: str,
    *,
    instance: str,
    headers: Mapping[str, str] | None = None,
    errors: Sequence[ValidationIssue] | None = None,
) -> JSONResponse:
    """The response for an error: a problem details body with the status's phrase as title."""
    body = Problem(
        title=HTTPStatus(status).phrase,
        status=status,
        detail=readable(detail),
        instance=readable(instance),
    )
    content = body.model_dump()
    if errors is not None:
        content["errors"] = [e.model_dump() for e in errors]
    return JSONResponse(content, status_code=status, headers=headers, media_type=PROBLEM_JSON)


def validation_issues(raw: Sequence[Any], prefix: Sequence[str] = ()) -> list[ValidationIssue]:
    """pydantic's errors as bounded issues, each located below ``prefix``."""
    return [
        ValidationIssue(
            loc=[*prefix, *(readable(p, 100) for p in e.get("loc", ()))],
            msg=readable(e.get("msg", ""), 200),
            type=readable(e.get("type", ""), 100),
        )
        for e in raw[:MAX_VALIDATION_ISSUES]
    ]


def invalid(issues: Sequence[ValidationIssue], *, instance: str) -> JSONResponse:
    first = issues[0] if issues else ValidationIssue(loc=[], msg="invalid request", type="")
    detail = f"{'.'.join(first.loc)}: {first.msg}"
    if len(issues) > 1:
        detail += f" (and {len(issues) - 1} more)"
    return problem(422, detail, instance=instance, errors=issues)


def install(app: FastAPI) -> None:
    """Answer every error raised while handling a request with a problem details body."""

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return problem(
            exc.status_code,
            str(exc.detail),
            instance=request.url.path,
            headers=exc.headers,
            # A 422 always lists its invalid inputs; raised like this it names none.
            errors=[] if exc.status_code == 422 else None,
        )

    @app.exception_handler(RequestValidationError)
    async def invalid_request(request: Request, exc: RequestValidationError) -> JSONResponse:
        return invalid(validation_issues(exc.errors()), instance=request.url.path)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        # Starlette re-raises after this answer, so the server logs the traceback.
        return problem(
            500, "internal error: the daemon's log has the details", instance=request.url.path
        )


def problems(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route for the error ``statuses`` it answers with."""
    return {status: _declared(status, HTTPStatus(status).phrase) for status in statuses}


def _declared(status: int, description: str) -> dict[str, Any]:
    model = ValidationProblem if status == 422 else Problem
    ref = _SCHEMA_REF.format(model=model.__name__)
    return {"description": description, "content": {PROBLEM_JSON: {"schema": {"$ref": ref}}}}


# Any request may carry a body over the limit, and any may meet a bug.
_ANY_OPERATION = {
    413: "the request body is over the limit",
    500: "a bug: the daemon's log has the details",
}
_AUTHENTICATION = {401: "credentials missing or wrong (read authentication is configured)"}


def document(
    app: FastAPI,
    *,
    authenticated: Callable[[str], bool],
    schemes: Mapping[str, dict[str, Any]],
    models: Sequence[type[BaseModel]] = (),
) -> None:
    """Build the app's OpenAPI document with the problem schemas (and ``models``, the schemas
    that routes refer to themselves) and, on every operation, the errors any operation may
    answer with. ``authenticated(path)`` tells which paths need credentials: they may answer
    401, and take any of the security ``schemes`` (by name) unless the operation says which."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(
                title=app.title, version=app.version, summary=app.summary, routes=app.routes
            )
            components = schema.setdefault("components", {})
            schemas = components.setdefault("schemas", {})
            documented: list[type[BaseModel]] = [Problem, ValidationProblem, *models]
            for model in documented:
                # Problems are sent (serialization), the other models received (validation).
                found = model.model_json_schema(
                    ref_template=_SCHEMA_REF,
                    mode="serialization" if issubclass(model, Problem) else "validation",
                )
                schemas.update(found.pop("$defs", {}))
                schemas[model.__name__] = found
            declared = components.setdefault("securitySchemes", {})
            for path, operations in schema.get("paths", {}).items():
                common = dict(_ANY_OPERATION)
                if authenticated(path):
                    common.update(_AUTHENTICATION)
                for operation in operations.values():
                    responses = operation.setdefault("responses", {})
                    for status, description in common.items():
                        responses.setdefault(str(status), _declared(status, description))
                    if authenticated(path) and "security" not in operation:
                        operation["security"] = [{name: []} for name in schemes]
                        declared.update(schemes)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]  # FastAPI's documented override
