"""An OpenAI- and ollama-compatible HTTP server for one loaded model, on the standard library alone.

    server = make_server(lfm_edge.load("model.gguf"), port=8080)
    server.serve_forever()

OpenAI: POST /v1/chat/completions, POST /v1/completions, GET /v1/models; llama-server's
POST /tokenize and /detokenize; GET /health. ollama: POST /api/chat, /api/generate,
/api/show; GET /api/tags, /api/version, /api/ps.

The parts, in layers (as llama.cpp's tools/server):
- protocol.py: the OpenAI API: requests checked and turned into Jobs, replies shaped;
- ollama.py: the same for ollama's API;
- runner.py: the one place that drives the model (every request a sequence of the batched
  engine, lfm_edge/engine.py: up to `parallel` decode together, more wait in a bounded queue);
- http.py: the handler, the routes, authentication and the wire.

Replies are split by lfm_edge.reply, as in every front end: reasoning becomes
`reasoning_content` (ollama: `thinking`); when the request offered tools,
`<|tool_call_start|>[f(a=1)]<|tool_call_end|>` blocks become `tool_calls`. A
response_format / format, a forced tool choice or strict tools hold the reply to a grammar
(lfm_edge.grammar). Whole and streamed answers are made from the same events, so they agree.
"""

from .http import Handler, Server, bind_warning, check_port, is_loopback, listen, make_server
from .protocol import Job, RequestError, chat_messages, error_body, openai_message
from .runner import Runner

__all__ = [
    "Handler", "Job", "RequestError", "Runner", "Server", "bind_warning", "chat_messages",
    "check_port", "error_body", "is_loopback", "listen", "make_server", "openai_message",
]
