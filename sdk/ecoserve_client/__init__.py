"""EcoServe Python SDK: a small client of the scheduler's gRPC API, sync and asyncio.

from ecoserve_client import Client
with Client("127.0.0.1:50051") as c:
    print(c.complete("Hello", max_tokens=16).text)
    for chunk in c.generate("Tell me a story", max_tokens=64):
        print(chunk.text, end="", flush=True)
"""

from .client import AsyncClient, Chunk, Client, Completion, EcoServeError, InvalidSampling

__all__ = ["AsyncClient", "Chunk", "Client", "Completion", "EcoServeError", "InvalidSampling"]
