"""The `gateway` command."""

from __future__ import annotations

import argparse
import os
import sys

from app.cli import admin, check, serve

SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what a shell reports for a writer whose reader went away


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="OpenAI-compatible gateway in front of OpenRouter.")
    parser.add_argument("--url", dest="top_url", help=admin.URL_HELP)
    commands = parser.add_subparsers(dest="command", required=True)
    serve.add_commands(commands)
    check.add_command(commands)
    admin.add_commands(commands)
    args = parser.parse_args(argv)
    try:
        code: int = args.handler(args)
        sys.stdout.flush()  # here, not at exit, where a closed pipe could only be reported as a traceback
    except BrokenPipeError:
        # `gateway keys list | head -1`: the reader has what it wanted. Python's own flush at exit
        # would fail again, so the output streams go to /dev/null first.
        devnull = os.open(os.devnull, os.O_WRONLY)
        for stream in (sys.stdout, sys.stderr):
            os.dup2(devnull, stream.fileno())
        return SIGPIPE_EXIT
    return code


if __name__ == "__main__":
    sys.exit(main())
