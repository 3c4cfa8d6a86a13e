"""Failed deliveries and dead-lettering on RabbitMQ, for ``amqp``.

What RabbitMQ counts, and what we add (``Message.delivery_count``):

* Quorum queues count failed deliveries themselves, in the ``x-delivery-count``
  header: a channel that closed with the message unacknowledged (its holder died,
  or the link dropped) and a ``basic.reject`` with requeue. Before RabbitMQ 4.3
  they count every return, a ``basic.nack`` with requeue too, so there a plain
  requeue (a warm shutdown's give-back, a task's ``Reject(requeue=True)``) is
  counted as well; from 4.3 on a ``basic.nack`` is not, and ``reject(requeue=True)``
  sends one. ``requeue_failed`` is a ``basic.reject``.
* Classic queues count nothing (``redelivered`` says only "maybe seen before"), so
  ``requeue_failed`` publishes a copy of the message to its queue carrying the
  count in our header ``x-taskframe-failed-deliveries`` (publisher-confirmed),
  then acks the original: a crash between the two runs the message twice, as a
  lost late ack would. A holder that dies is NOT counted on a classic queue: its
  messages come back as they were. Use quorum queues to bound those.

The broker's own limit (option ``delivery_limit``, off by default): a quorum queue
is declared with ``x-delivery-limit`` and a dead-letter route to ``<queue>.dead``
(the default exchange, ``x-dead-letter-routing-key``), that queue declared first, so
RabbitMQ dead-letters a message even if no worker gets to look at its count (the
worker stops it one delivery earlier, and stores its FAILURE). Off by default
because queue arguments must match whenever a queue is declared again, and Celery
declares its queues (clients too, on their first publish) without them: a Celery
app sharing the queue would get ``PRECONDITION_FAILED`` (unless it declares the same
arguments: ``limit_arguments``). Without it the worker's own limit still holds on
quorum queues, RabbitMQ counting for it. With it, a queue that exists without these
arguments (or with others) is used as it is, with one warning per connection saying
so and what to do, and the worker then dead-letters by publishing to
``<queue>.dead`` itself. Classic queues never get these arguments. A RabbitMQ policy
(``delivery-limit``, ``dead-letter-exchange``, ``dead-letter-routing-key``) gives the
same without any declaration clash.

``dead_letter``: ``basic.reject`` without requeue where the queue has a dead-letter
exchange, else a copy published to ``<queue>.dead`` (declared like the queue),
then the ack. A copy that the broker refuses is not dropped: the message is given
back (``basic.nack``) and the next delivery tries again.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from typing import Any

from .amqp_link import Link
from .amqp_messages import FAILED_DELIVERIES_HEADER
from .base import Envelope, Message
from .entities import Queue, dead_letter_queue
from .errors import PublishError, TransportError

__all__ = [
    "DELIVERY_LIMIT_ARG",
    "DLX_ARG",
    "DLX_ROUTING_KEY_ARG",
    "dead_letter",
    "dead_letter_route",
    "declare_dead",
    "declare_queue",
    "limit_arguments",
    "requeue_failed",
]

logger = logging.getLogger("taskframe.transport.amqp")

# Queue arguments RabbitMQ reads for its delivery limit.
DELIVERY_LIMIT_ARG = "x-delivery-limit"
DLX_ARG = "x-dead-letter-exchange"
DLX_ROUTING_KEY_ARG = "x-dead-letter-routing-key"
_LIMIT_ARGS = (DELIVERY_LIMIT_ARG, DLX_ARG, DLX_ROUTING_KEY_ARG)

#: Publishes an envelope to (exchange, routing key), confirmed: ``AMQPTransport.publish``.
Publish = Callable[..., None]


def limit_arguments(queue: Queue, limit: int | None) -> dict[str, Any]:
    """The arguments a quorum queue gets for ``delivery_limit`` (none of the user's replaced)."""
    if not limit or queue.queue_type != "quorum":
        return {}
    extra: dict[str, Any] = {}
    if DELIVERY_LIMIT_ARG not in queue.arguments:
        extra[DELIVERY_LIMIT_ARG] = int(limit)
    if DLX_ARG not in queue.arguments:
        extra[DLX_ARG] = ""
        extra[DLX_ROUTING_KEY_ARG] = dead_letter_queue(queue.name)
    return extra


def dead_letter_route(queue_name: str, arguments: Mapping[str, Any]) -> str | None:
    """Where RabbitMQ dead-letters a message of a queue declared with ``arguments``."""
    if DLX_ARG not in arguments:
        return None
    exchange = str(arguments[DLX_ARG])
    key = arguments.get(DLX_ROUTING_KEY_ARG)
    if not exchange and key:
        return str(key)  # the default exchange: the queue named by the key
    return f"dead-letter exchange {exchange!r}" + (f" (routing key {key!r})" if key else "")


def declare_queue(link: Link, queue: Queue, arguments: Mapping[str, Any],
                  extra: Mapping[str, Any]) -> bool:
    """Declare ``queue`` with ``arguments`` and ``extra``; False when it exists otherwise.

    A queue that exists with other delivery-limit arguments than asked (``extra``, or
    none) is used as it is, with a warning: the others are RabbitMQ's refusals as before.

    Raises:
        TransportError: RabbitMQ refused the declaration for another reason.
    """
    what = f"declaring queue {queue.name!r}"
    if DLX_ARG in extra:  # our dead-letter route: its queue first
        declare_dead(link, queue)
    try:
        with link.translate(what):
            _declare(link, queue, {**arguments, **extra})
        return bool(extra)
    except TransportError as exc:
        if not _about(exc, _LIMIT_ARGS):
            raise
        refusal = str(exc)
    if not (extra and _declared_without(link, queue, arguments, what)):
        with link.translate(what):  # it exists with other ones: as it is, it will do
            link.pub.queue_declare(queue=queue.name, passive=True)
    logger.warning(
        "queue %r exists with other delivery-limit arguments than %s (%s): it is used as it "
        "is. A taskframe worker still stops messages over its worker_delivery_limit; "
        "RabbitMQ applies only the queue's own arguments, if any. To change them, delete the "
        "queue so that it is declared again, or set a policy (delivery-limit, "
        "dead-letter-exchange, dead-letter-routing-key); declare it alike everywhere "
        "(broker_transport_options['delivery_limit'])", queue.name, dict(extra) or "none",
        refusal)
    return False


def _declared_without(link: Link, queue: Queue, arguments: Mapping[str, Any], what: str) -> bool:
    """Declare ``queue`` without the delivery-limit arguments; False if it has others."""
    try:
        with link.translate(what):
            _declare(link, queue, arguments)
    except TransportError as exc:
        if not _about(exc, _LIMIT_ARGS):
            raise
        return False
    return True


def declare_dead(link: Link, queue: Queue) -> str:
    """Make ``<queue>.dead`` exist (of the queue's type, if new); return its name."""
    name = dead_letter_queue(queue.name)
    what = f"declaring queue {name!r}"
    arguments = {"x-queue-type": "quorum"} if queue.queue_type == "quorum" else {}
    try:
        with link.translate(what):
            _declare(link, Queue(name), arguments)
    except TransportError as exc:
        if "PRECONDITION_FAILED" not in str(exc):
            raise
        # It exists, declared otherwise: it will do. (py-amqp reopens a channel that
        # RabbitMQ closed for a refusal, confirm mode included.)
        with link.translate(what):
            link.pub.queue_declare(queue=name, passive=True)
    return name


def _declare(link: Link, queue: Queue, arguments: Mapping[str, Any]) -> None:
    link.pub.queue_declare(queue=queue.name, durable=queue.durable, exclusive=queue.exclusive,
                           auto_delete=queue.auto_delete, arguments=dict(arguments))


def _about(exc: TransportError, names: tuple[str, ...]) -> bool:
    """Whether RabbitMQ's refusal ``exc`` (PRECONDITION_FAILED) names one of ``names``."""
    text = str(exc)
    return "PRECONDITION_FAILED" in text and any(f"'{name}'" in text for name in names)


def requeue_failed(link: Link, publish: Publish, message: Message, queue: Queue | None) -> None:
    """Give ``message`` back, its delivery counted (see the module docstring)."""
    if queue is None or queue.queue_type == "quorum":
        with link.translate("rejecting a message", channel_lost=True):
            link.sub.basic_reject(message.delivery_tag, requeue=True)
        return
    copy = message.to_envelope()
    copy.headers[FAILED_DELIVERIES_HEADER] = message.delivery_count
    _move(link, publish, message, copy, queue.name)


def dead_letter(link: Link, publish: Publish, message: Message, queue: Queue,
                route: str | None) -> str:
    """Settle ``message`` of ``queue`` into its dead-letter queue; return where it went.

    ``route``: where the queue's dead-letter exchange sends it, when it has one.
    """
    if route is not None:
        with link.translate("dead-lettering a message", channel_lost=True):
            link.sub.basic_reject(message.delivery_tag, requeue=False)
        return route
    dead = declare_dead(link, queue)
    _move(link, publish, message, message.to_envelope(), dead)
    return dead


def _move(link: Link, publish: Publish, message: Message, copy: Envelope, queue: str) -> None:
    """Publish ``copy`` to ``queue`` (confirmed), then ack ``message``; a refusal gives it back."""
    try:
        publish(copy, exchange="", routing_key=queue)
    except PublishError as exc:
        logger.error("could not publish a copy of message %r to %r (%s): given back instead",
                     message.delivery_tag, queue, exc)
        with link.translate("giving a message back", channel_lost=True):
            link.give_back(message.delivery_tag)
        return
    with link.translate("acknowledging a message", channel_lost=True):
        link.sub.basic_ack(message.delivery_tag)
