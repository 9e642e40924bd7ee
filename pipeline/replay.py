"""`python -m pipeline.replay FOLDER`: write a run's record kept on disk while its tracking server was lost.

A run whose tracking server stopped answering and did not answer again before the run ended keeps what it
would have written in `mlflow-pending/<run id>/` and prints this command as its last line. Run it once the
server is back: it writes, in order, what the server lacks (params, every epoch's points with their own
times, tags, artifacts, figures, models and their registration) and ends the run with its true status and
end time. Running it again writes nothing twice (pipeline/tracking/operations.py).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m pipeline.replay", description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path, help="the kept record's folder, as the run printed it")
    args = parser.parse_args(argv)
    import logging

    from pipeline.tracking import operations

    logging.getLogger("mlflow").setLevel(logging.WARNING)  # (its progress lines; what was written is said below)
    try:
        print(operations.replay(args.folder))
    except (FileNotFoundError, ConnectionError, PermissionError) as error:
        print(f"{type(error).__name__}: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("SIGINT: stopped; what was written is counted in written.txt, and running the command again "
              "writes the rest", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
