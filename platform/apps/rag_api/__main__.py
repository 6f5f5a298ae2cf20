"""``python -m rag_api [--host H] [--port P]``: serve the app with uvicorn."""

from __future__ import annotations

import argparse

import uvicorn

from rag_api.app import create_app, settings_or_exit


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m rag_api", description=__doc__)
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8080, help="port to bind, 0 for any (default: %(default)s)")
    args = parser.parse_args(argv)
    app = create_app(settings_or_exit())
    # Our own access log replaces uvicorn's; proxy headers are read by the app, not rewritten.
    uvicorn.run(app, host=args.host, port=args.port, access_log=False, proxy_headers=False)


if __name__ == "__main__":
    main()
