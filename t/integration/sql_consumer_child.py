"""A consumer process for test_transport_sql_processes.py (run as a script, not collected).

Usage: python sql_consumer_child.py URL OPTIONS_JSON QUEUE WORKDIR NAME

Writes WORKDIR/NAME.ready once connected, consumes QUEUE acking every message,
and once WORKDIR/published exists and the queue is drained, writes the ids it
consumed to WORKDIR/NAME.json.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

from taskframe.transport import Queue
from taskframe.transport.connection import transport_class

GIVE_UP_AFTER = 240.0


def main(url: str, options_json: str, queue: str, workdir: Path, name: str) -> int:
    transport = transport_class(url)(url, json.loads(options_json))
    transport.connect()
    transport.consume([Queue(queue)], prefetch_count=10)
    (workdir / f"{name}.ready").touch()
    consumed: list[int] = []
    idle = 0
    give_up = time.monotonic() + GIVE_UP_AFTER
    while time.monotonic() < give_up:
        messages = transport.poll(timeout=0.5)
        for message in messages:
            consumed.append(json.loads(message.body)["id"])
            message.ack()
        transport.maintain()
        drained = (workdir / "published").exists() and transport.queue_size(queue) == 0
        idle = idle + 1 if drained and not messages else 0
        if idle >= 3:
            break
    transport.close()
    (workdir / f"{name}.json").write_text(json.dumps(consumed))
    return 0 if idle >= 3 else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2], sys.argv[3], Path(sys.argv[4]), sys.argv[5]))
