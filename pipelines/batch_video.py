"""Ready job: answer one question about many video files, resumably, on Ray or in-process.

    python -m pipelines.batch_video clips/ -q "what happens?" -o results.jsonl [--num-workers N]

is `streamprune batch ...` (same flags, defaults and exit codes; see `streamprune batch --help`).
"""

from __future__ import annotations

import sys

from streamprune import cli


def main(argv: list[str] | None = None) -> int:
    return cli.main(["batch", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
