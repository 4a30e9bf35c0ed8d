"""The `gateway` command."""

from __future__ import annotations

import argparse
import sys

from app.cli import admin, serve


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible gateway in front of OpenRouter.")
    parser.add_argument("--url", dest="top_url", help=admin.URL_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_commands(commands)
    admin.add_commands(commands)
    args = parser.parse_args(argv)
    code: int = args.handler(args)
    return code


if __name__ == "__main__":
    sys.exit(main())
