"""``python -m lcl_tune.adapters.sender SPOOL``: send a driver's spool from a process of its own.

Started by :class:`~lcl_tune.adapters.spool.SenderProcess` (the driver's closes of trial runs). It
follows the journal the driver appends to and sends each record in order, as a trial's sender
thread does; when its standard input ends (the driver closed the pipe, or died) it sends what is
left for at most :data:`DRAIN_S` seconds and exits. What it could not send stays in the journal,
for the end of the study or ``lcl-tune sync``.
"""

from __future__ import annotations

import sys
from pathlib import Path

DRAIN_S = 60.0


def main(argv: list[str] | None = None) -> int:
    from lcl_tune.adapters import tracking as T
    from lcl_tune.adapters.spool import Spool, SpoolSender

    (path,) = argv if argv is not None else sys.argv[1:]
    # T.execute looked up at each call: the test faults (tests/faults) patch the module's function
    sender = SpoolSender(Spool(Path(path), durable=False), lambda record, state: T.execute(record, state),
                         what="driver", follow=True, poll_s=0.1)
    sys.stdin.buffer.read()  # until the driver closes the pipe, or dies
    return 0 if sender.close(DRAIN_S) else 1


if __name__ == "__main__":
    sys.exit(main())
