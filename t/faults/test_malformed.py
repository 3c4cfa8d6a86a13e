"""The six kinds of malformed message, between good tasks, on each broker.

Bad JSON, no ``task`` header, an unknown task, a refused content type (pickle, with
``accept_content`` json only), a body that is not the protocol v2 triple, and a zip
bomb (4 MiB of JSON compressed to a few KiB, over a ``worker_max_message_size`` of
1 MiB; without the limit it decodes to a valid task and runs). Each must be rejected
with an error line naming it, none must run, and the worker goes on: every good task
ends, nothing is left in the queue or held, and on RabbitMQ the six are dead-lettered.
"""

from __future__ import annotations

import json
import pickle
import uuid
import zlib
from typing import Any

import pytest
from faults.harness import Run
from faults.scenarios import Scenarios, shared_broker

from taskframe.protocol import TaskMessage, encode_task
from taskframe.transport import Queue

LIMIT = 1 << 20
GOOD_BODY = json.dumps([[0.0], {}, {"callbacks": None, "errbacks": None, "chain": None,
                                    "chord": None}])


def _message(kind: str) -> tuple[str, dict[str, Any]]:
    """One malformed message: its task id and the ``Producer.publish`` arguments."""
    task_id = str(uuid.uuid4())
    name = "fproj.nope" if kind == "unknown_task" else "fproj.work"
    headers, properties, _ = encode_task(TaskMessage(id=task_id, name=name, args=[0.0]))
    body: str | bytes = GOOD_BODY
    content_type = "application/json"
    compression = None
    if kind == "bad_json":
        body = '[[0.0], {}, {"callbacks": nul'
    elif kind == "no_task_header":
        del headers["task"]
    elif kind == "refused_content_type":
        body, content_type = pickle.dumps(([0.0], {}, {})), "application/x-python-serialize"
    elif kind == "not_v2_triple":
        body = json.dumps([[0.0], {}])
    elif kind == "zip_bomb":
        body, compression = GOOD_BODY + " " * (4 * LIMIT), "zlib"
    return task_id, {"body": body.encode() if isinstance(body, str) else body,
                     "headers": headers, "properties": properties,
                     "content_type": content_type, "compression": compression}


KINDS = ["bad_json", "no_task_header", "unknown_task", "refused_content_type",
         "not_v2_triple", "zip_bomb"]


def _publish_bad(run: Run, kinds: list[str]) -> list[str]:
    producer = run.client.producer()
    queue = run.client.router.queue(run.queue)
    declare = [queue, Queue(f"{run.queue}.dead")] if run.dead_letter else [queue]
    ids = []
    for kind in kinds:
        task_id, publish = _message(kind)
        producer.publish(routing_key=run.queue, declare=declare, **publish)
        ids.append(task_id)
    return ids


@pytest.mark.parametrize("kind", ["redis", "amqp"])
def test_malformed_messages(faults: Scenarios, kind: str) -> None:
    broker = shared_broker(kind)
    conf = {"worker_max_message_size": LIMIT}
    assert len(zlib.compress(b" " * (4 * LIMIT))) < LIMIT
    for run in faults.runs(broker, conf=conf, dead_letter=kind == "amqp"):
        bad = _publish_bad(run, KINDS[:3])
        run.send(10, 0.05)
        bad += _publish_bad(run, KINDS[3:])
        run.send(10, 0.05)
        run.forbid(bad)
        run.start_worker("-P", "threads", "-c", "4")
        run.wait_ended(60)
        tally = run.tally()
        errors = [ln for ln in tally.logs.splitlines() if "ERROR" in ln]
        for kind_, task_id in zip(KINDS, bad, strict=True):
            assert any(task_id in ln for ln in errors), \
                f"no error line names the {kind_} message {task_id}:\n" + "\n".join(errors)
        assert run.queue_size(run.queue) == 0
        if kind == "amqp":
            assert run.queue_size(f"{run.queue}.dead") == len(KINDS)
        else:
            assert run.redis_held() == 0
