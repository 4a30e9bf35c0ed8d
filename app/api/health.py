"""Liveness, readiness and the Prometheus exposition (its credential is checked by the edge)."""

from __future__ import annotations

from fastapi import APIRouter, Security
from fastapi.security import HTTPBearer
from starlette.responses import JSONResponse, Response

from app.api.deps import GatewayDep
from app.store import StoreError
from app.usage.metrics import CONTENT_TYPE

router = APIRouter(tags=["Operations"])
# for the schema only: EdgeMiddleware refuses a scrape without the key before any route runs
_scrape_key = HTTPBearer(auto_error=False, scheme_name="MetricsKey", description="GATEWAY_METRICS_KEY or the admin key")


@router.head("/healthz", include_in_schema=False)
@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/metrics", summary="Prometheus metrics", response_class=Response, dependencies=[Security(_scrape_key)])
async def metrics(gateway: GatewayDep) -> Response:
    return Response(gateway.metrics.exposition(), media_type=CONTENT_TYPE)


@router.head("/readyz", include_in_schema=False)
@router.get("/readyz", summary="Ready to take traffic")
async def readyz(gateway: GatewayDep) -> JSONResponse:
    if gateway.draining:
        return JSONResponse({"status": "draining"}, status_code=503)
    try:
        await gateway.store.ping()
    except StoreError:
        return JSONResponse({"status": "store unavailable"}, status_code=503)
    return JSONResponse({"status": "ready"})
