"""The simulator as a FastAPI app: `create_app(config)` for uvicorn, tests and the stack."""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from sandbox.wavespeed import admin, api, cdn
from sandbox.wavespeed.config import SimulatorConfig
from sandbox.wavespeed.errors import CutShortFilter, install_error_handlers
from sandbox.wavespeed.simulator import Simulator

_cut_short_filter = CutShortFilter()


def create_app(config: SimulatorConfig | None = None) -> FastAPI:
    """A simulator app with its own in-memory account; nothing is shared between two apps."""
    sim = Simulator(config or SimulatorConfig())

    @asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await sim.start()
        try:
            yield
        finally:
            await sim.stop()

    app = FastAPI(
        title="WaveSpeed simulator",
        lifespan=lifespan,
        docs_url="/_sim/docs",
        redoc_url=None,
        openapi_url="/_sim/openapi.json",
    )
    app.state.simulator = sim
    install_error_handlers(app)
    # Admin and CDN routes first: the API's catch-all model route must not shadow them.
    app.include_router(admin.router)
    app.include_router(cdn.router)
    app.include_router(api.router)
    logging.getLogger("uvicorn.error").addFilter(_cut_short_filter)
    return app
