"""`chatcore serve`: an OpenAI-compatible HTTP server on the engine, with conversations kept in storage.

    state = ServerState(serving_engine(engine), storage.open_store(), ServerConfig(model_name="demo"))
    app = create_app(state)            # a FastAPI app; `chatcore serve` runs it under uvicorn

No torch here: generation goes through the engine's API (a BatchEngine when chatcore has one), storage through
`storage`, turns through `context.ChatSession`.
"""

from .app import create_app
from .backend import LockedEngine, serving_engine
from .errors import APIError
from .state import ServerConfig, ServerState

__all__ = ["APIError", "LockedEngine", "ServerConfig", "ServerState", "create_app", "serving_engine"]
