"""The scheduler's OpenAI-compatible HTTP API: a second front door to the gRPC front's pipeline.

app.py builds the ASGI app (routes, error handlers) from the scheduler's pipeline objects;
schemas.py holds the request bodies, convert.py maps them to GenerateRequests and pieces back
to OpenAI's JSON, run.py streams one request's choices, chat.py renders chat templates,
errors.py gives errors OpenAI's shape, server.py runs uvicorn on the gRPC server's event loop,
tool_parsers.py finds tool calls in free text (tool_choice "auto"), reasoning.py splits a
thinking model's <think> block from its answer.
"""

from . import reasoning, tool_parsers
from .app import build_http_app
from .chat import ChatTemplate
from .server import HttpServer

__all__ = ["ChatTemplate", "HttpServer", "build_http_app", "reasoning", "tool_parsers"]
