"""``/docs`` (Swagger UI) served from local files, for every HTTP service of freshrec.

FastAPI's own ``/docs`` page loads Swagger UI's script and styles from a CDN, so on a
machine without internet (this project's, a shop's locked-down network) the page stays
blank while ``/openapi.json`` works. The ``swagger-ui-bundle`` package ships those files;
:func:`mount_offline_docs` serves them under ``/docs/assets`` and points the page at them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

ASSETS = "/docs/assets"


def swagger_ui_dir() -> Path:
    """The folder holding ``swagger-ui-bundle.js`` and ``swagger-ui.css``."""
    import swagger_ui_bundle

    return Path(swagger_ui_bundle.swagger_ui_path)


def mount_offline_docs(app: Any, title: str) -> None:
    """Add ``GET /docs`` and its assets to ``app`` (created with ``docs_url=None``)."""
    from fastapi.openapi.docs import get_swagger_ui_html
    from fastapi.responses import HTMLResponse
    from fastapi.staticfiles import StaticFiles

    app.mount(ASSETS, StaticFiles(directory=swagger_ui_dir()), name="docs-assets")

    @app.get("/docs", include_in_schema=False)
    async def docs() -> HTMLResponse:
        return get_swagger_ui_html(
            openapi_url=app.openapi_url,
            title=f"{title} - API",
            swagger_js_url=f"{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{ASSETS}/favicon-32x32.png",
        )
