"""`dllm-export serve`: an OpenAI-compatible HTTP server (FastAPI + uvicorn) for any artifact, with
Ollama's API beside (`ollama`).

    engine = load_engine("default")              # or an ONNX / GGUF artifact folder
    make_server(engine, ServeConfig(port=8000)).run(sockets=[bind_socket("127.0.0.1", 8000)])
"""

from .app import ServeConfig, bind_socket, create_app, make_server
from .engine import Engine, load_engine

__all__ = ["Engine", "ServeConfig", "bind_socket", "create_app", "load_engine", "make_server"]
