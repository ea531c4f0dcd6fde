"""`python -m tlbuild.train.torchrun ARGS`: torchrun itself, returning the workers' exit code.

`python -m torch.distributed.run` exits 1 with a Python traceback whenever a worker fails; a
worker's usage error (exit code 2) and its one-line message should reach the user as they are.
Same arguments, same launcher (torch.distributed.run's parse_args and run); only the ending
differs.
"""

from __future__ import annotations

import sys


def main(argv: list[str] | None = None) -> int:
    """Launch as torchrun does; the first failed worker's exit code, 130 when interrupted."""
    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    try:
        run(parse_args(argv))
    except ChildFailedError as e:
        _, failure = e.get_first_failure()
        # A worker killed by a signal has a negative code; the shell's convention is 128 + n.
        return failure.exitcode if failure.exitcode > 0 else 128 - failure.exitcode
    except (KeyboardInterrupt, SignalException):
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
