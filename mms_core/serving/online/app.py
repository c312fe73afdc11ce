"""The online server's FastAPI app, composed: the runtime (Dask client, router, meter, lease) in the
lifespan, the API-key dependency, the route groups, the Host-header guard and the error handlers."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from starlette.middleware.trustedhost import TrustedHostMiddleware

from mms_core.serving.metering import KeyStore, UsageMeter
from mms_core.serving.online.auth import Auth
from mms_core.serving.online.config import ServeConfig
from mms_core.serving.online.errors import install_handlers
from mms_core.serving.online.routes_admin import admin_routes
from mms_core.serving.online.routes_ops import ops_routes
from mms_core.serving.online.routes_predict import predict_routes
from mms_core.serving.online.runtime import Loader, ServedModel, ServingRuntime

__all__ = ["ServedModel", "create_app"]


def create_app(
    *,
    config: ServeConfig,
    model: ServedModel,
    scheduler_address: str,
    keys: KeyStore | None,
    meter: UsageMeter | None,
    loader: Loader | None = None,
    home: Path | None = None,
) -> FastAPI:
    """The server for ``model``; replicas start on the Dask cluster at ``scheduler_address``.

    Args:
        keys: API keys (None: no key is valid; predictions then work only where keys are optional,
            and the admin API not at all).
        meter: usage counters per key, flushed to the metering database (None: not metered).
        loader: version -> (package, weights, version) from the registry, for /admin/versions.
        home: MMS_HOME, where the serving lease protects the served versions from retention.
    """
    runtime = ServingRuntime(
        config=config, model=model, scheduler_address=scheduler_address, meter=meter, loader=loader, home=home
    )
    auth = Auth(keys=keys, required=config.auth_required)
    app = FastAPI(title="MMS online predictor", lifespan=runtime.lifespan)
    app.state.runtime = runtime
    app.include_router(predict_routes(runtime, auth))
    app.include_router(ops_routes(runtime))
    app.include_router(admin_routes(runtime, auth))
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=config.allowed_hosts)
    install_handlers(app)
    return app
