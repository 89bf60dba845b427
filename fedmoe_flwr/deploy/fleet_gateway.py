"""The Fleet gateway: the only address of a SuperLink that devices (and the internet) reach.

Flower 1.41's ``flower-superlink`` serves its Fleet, Control and Runtime APIs on one HTTP
address, and the open-source Control API authenticates nobody: anyone who reaches it can
register a SuperNode key (``flwr supernode register evil.pub``), start runs or stop them
(see :mod:`.commands` and docs/deployment.md, "Network exposure"). So the SuperLink listens
on 127.0.0.1 only, and this gateway listens on the public address and forwards requests to
the Fleet API (``POST /v1/fleet/*``: what ``flower-supernode`` calls) and refuses every other
path with 403. TLS ends here with the SuperLink's own certificate (a proxy that sees paths
must), and the hop to the SuperLink is TLS again, verified with the CA. SuperNode
authentication is untouched: it signs headers, which are forwarded as they are, and the
SuperLink checks them.

    python -m fedmoe_flwr.deploy.fleet_gateway --host 0.0.0.0 --port 9092 --superlink 127.0.0.1:8000 \\
        --ssl-certfile certs/server.pem --ssl-keyfile certs/server.key --ssl-ca-certfile certs/ca.crt
"""

from __future__ import annotations

import argparse
import ssl
import sys
from contextlib import asynccontextmanager

FLEET_PREFIX = "/v1/fleet/"
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]
# Per-connection headers (RFC 9110 7.6.1) and the ones httpx sets itself; the rest pass through.
_NOT_FORWARDED = {"host", "content-length", "connection", "keep-alive", "proxy-connection", "transfer-encoding",
                  "te", "trailer", "upgrade", "accept-encoding", "content-encoding"}


def upstream_client_kwargs(superlink: str, ca: str | None, insecure: bool) -> tuple[str, dict]:
    """Base URL of the SuperLink and the ``httpx`` options to reach it."""
    if insecure:
        return f"http://{superlink}", {}
    verify = ssl.create_default_context(cafile=ca) if ca else True
    return f"https://{superlink}", {"verify": verify}


def create_app(superlink: str, *, ca: str | None = None, insecure: bool = False):
    """A Starlette app that forwards ``POST /v1/fleet/*`` to ``superlink`` (``host:port``) and refuses the rest."""
    import httpx
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import PlainTextResponse, Response
    from starlette.routing import Route

    base, kwargs = upstream_client_kwargs(superlink, ca, insecure)
    # Fleet calls are unary; a SuperNode's own client gives up after 30 s, so a read never needs longer.
    timeout = httpx.Timeout(10.0, read=120.0, write=120.0)
    held: dict[str, httpx.AsyncClient] = {}

    @asynccontextmanager
    async def lifespan(app):
        async with httpx.AsyncClient(base_url=base, timeout=timeout, **kwargs) as client:
            held["client"] = client
            yield

    async def forward(request: Request) -> Response:
        path = request.url.path
        if request.method != "POST" or not path.startswith(FLEET_PREFIX):
            return PlainTextResponse(f"{request.method} {path}: this address serves only the Fleet API "
                                     f"(POST {FLEET_PREFIX}*)\n", status_code=403)
        headers = [(k, v) for k, v in request.headers.items() if k.lower() not in _NOT_FORWARDED]
        try:
            reply = await held["client"].post(path, content=await request.body(), headers=headers,
                                              params=request.query_params.multi_items())
        except httpx.TransportError as ex:
            return PlainTextResponse(f"the SuperLink at {superlink} is unavailable: {ex!r}\n", status_code=502)
        out = {k: v for k, v in reply.headers.items() if k.lower() not in _NOT_FORWARDED}
        return Response(reply.content, status_code=reply.status_code, headers=out)

    return Starlette(routes=[Route("/{path:path}", forward, methods=ALL_METHODS)], lifespan=lifespan)


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--host", required=True, help="address to listen on (0.0.0.0: every interface)")
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--superlink", required=True, help="the SuperLink's host:port (on loopback)")
    ap.add_argument("--ssl-certfile", help="the server certificate (PEM) devices verify")
    ap.add_argument("--ssl-keyfile", help="its private key")
    ap.add_argument("--ssl-ca-certfile", help="the CA that signed the SuperLink's certificate")
    ap.add_argument("--insecure", action="store_true", help="plain HTTP on both hops (tests without TLS only)")
    return ap


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    tls = (args.ssl_certfile, args.ssl_keyfile, args.ssl_ca_certfile)
    if args.insecure == any(tls) or not (args.insecure or all(tls)):
        print("give --ssl-certfile, --ssl-keyfile and --ssl-ca-certfile, or --insecure", file=sys.stderr)
        return 2
    import uvicorn

    app = create_app(args.superlink, ca=args.ssl_ca_certfile, insecure=args.insecure)
    print(f"Fleet gateway: {args.host}:{args.port} -> {args.superlink}{FLEET_PREFIX}*", flush=True)
    # uvicorn's "Uvicorn running on ..." (info) says it listens; one access-log line per call would flood the log
    uvicorn.run(app, host=args.host, port=args.port, ssl_certfile=args.ssl_certfile, ssl_keyfile=args.ssl_keyfile,
                log_level="info", access_log=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())
