"""An ETA further than RabbitMQ can delay, on a quorum queue, under a draining worker.

RabbitMQ's native delayed delivery waits at most ``2**28 - 1`` s (about 8.5 years). A
taskframe client refuses to send a task ten years ahead on a quorum queue; a client that
does not delay on the broker (Celery's, another framework's, a script) publishes it
straight to the queue, as this scenario does. The worker then tries to give it back to
the broker delayed, and the broker's ladder refuses. Before issue 14 (Why 3) that refusal
left the consumer loop and the worker exited, leaving the message to kill the next one.
The worker must keep the message itself, run the rest, and give it back to its queue at
a warm shutdown: it is neither run nor lost.
"""

from __future__ import annotations

import json
import uuid
from datetime import UTC, datetime, timedelta

from faults.scenarios import Scenarios, shared_broker

from taskframe.protocol import TaskMessage, encode_task

TEN_YEARS = timedelta(days=3653)
BODY = json.dumps([[0.0], {}, {"callbacks": None, "errbacks": None, "chain": None,
                               "chord": None}]).encode()


def test_far_eta_on_a_quorum_queue(faults: Scenarios) -> None:
    broker = shared_broker("amqp")
    conf = {"task_default_queue_type": "quorum", "task_acks_late": True}
    for run in faults.runs(broker, conf=conf):
        far = str(uuid.uuid4())
        headers, properties, _ = encode_task(TaskMessage(
            id=far, name="fproj.work", args=[0.0], eta=datetime.now(UTC) + TEN_YEARS))
        run.client.producer().publish(
            body=BODY, headers=headers, properties=properties, routing_key=run.queue,
            content_type="application/json", declare=[run.client.router.queue(run.queue)])
        run.send(10, 0.05)
        run.start_worker("-P", "threads", "-c", "2")
        run.wait_ended(60)
        assert "refused its delayed copy" in run.log_text()
        run.tally()  # stops the worker (warm): exit status 0, nothing lost or run twice
        assert far not in {task_id for _, task_id, _ in run.records()}, "the far ETA ran"
        assert run.queue_size(run.queue) == 1, "the far-ETA message is not back in its queue"
