"""A small ASGI app for the uvicorn recipe (docs/recipes.md): run unmodified by
`uvicorn app:app --fd 3` under baton (`baton run -c examples/uvicorn/baton.yaml`).

It answers every request with a line naming its process and baton's generation. Its lifespan
startup opens the readiness probe baton asks for: a Unix socket of this worker's own
(`BATON_PROBE_ADDRESS`) answering `HTTP/1.1 200` once the app has loaded, so the old generation is
retired only when this one's event loop turns. The app uses nothing but the standard library.
"""

import asyncio
import os

GENERATION = os.environ.get("BATON_GENERATION", "0")
BODY = f"hello from uvicorn, pid {os.getpid()}, generation {GENERATION}\n".encode()


async def probe(reader, writer):
    """One answer to baton's readiness probe, then close."""
    try:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\n\r\nok\n")
        await writer.drain()
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
        pass
    finally:
        writer.close()


async def lifespan(receive, send):
    probe_server = None
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            address = os.environ.get("BATON_PROBE_ADDRESS")
            if address:
                probe_server = await asyncio.start_unix_server(probe, path=address)
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            if probe_server is not None:
                probe_server.close()
            await send({"type": "lifespan.shutdown.complete"})
            return


async def app(scope, receive, send):
    if scope["type"] == "lifespan":
        await lifespan(receive, send)
        return
    if scope["type"] != "http":
        return
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"text/plain"),
                (b"content-length", str(len(BODY)).encode()),
                (b"x-baton-generation", GENERATION.encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": BODY})
