"""OpenAI model routes, built from OpenRouter's catalogue."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Request
from starlette.responses import Response

from app.api.deps import GatewayDep
from app.api.responses import JSON

router = APIRouter(tags=["OpenAI"])


@router.get("/models", summary="List the models this key may use")
async def list_models(request: Request, gateway: GatewayDep) -> Response:
    principal = await gateway.authenticate(request.headers.get("authorization"))
    return Response(await gateway.catalog.openai_list(principal.allows, principal.allowlists), media_type=JSON)


@router.get("/models/{model_id:path}", summary="Retrieve a model")
async def retrieve_model(model_id: str, request: Request, gateway: GatewayDep) -> dict[str, Any]:
    principal = await gateway.authenticate(request.headers.get("authorization"))
    return await gateway.catalog.openai_model(model_id, principal.allows)
