"""Every setting taskframe knows, with Celery's name and default, in ONE table.

Code reads settings by these names only (``app.conf.task_default_queue``); a name
that is not in this table warns with a did-you-mean when set. Durations are
seconds.
"""

from __future__ import annotations

from typing import Any

__all__ = ["DEFAULTS", "EMBEDDED_BACKEND_URL", "EMBEDDED_BROKER_URL"]

EMBEDDED_BROKER_URL = "sqlite:///taskframe.sqlite3"
EMBEDDED_BACKEND_URL = "db+sqlite:///taskframe.sqlite3"

DEFAULTS: dict[str, Any] = {
    # -- broker ------------------------------------------------------------------------
    "broker_url": None,
    "broker_read_url": None,
    "broker_write_url": None,
    "broker_transport_options": {},
    "broker_connection_retry": True,
    "broker_connection_retry_on_startup": True,
    "broker_connection_max_retries": 100,
    "broker_connection_timeout": 4.0,
    "broker_heartbeat": 60.0,
    "broker_pool_limit": 10,
    "broker_use_ssl": False,
    "broker_login_method": None,
    "broker_failover_strategy": None,
    "broker_channel_error_retry": False,
    # -- results -----------------------------------------------------------------------
    "result_backend": None,
    "result_backend_transport_options": {},
    "result_serializer": "json",
    "result_accept_content": None,
    "result_expires": 86400.0,
    "result_failure_expires": None,
    "result_extended": False,
    "result_persistent": None,
    "result_compression": None,
    "result_chord_join_timeout": 3.0,
    "result_chord_retry_interval": 1.0,
    "result_backend_always_retry": False,
    "result_backend_max_retries": 3.0,
    "database_table_names": {},
    "database_table_schemas": {},
    "database_engine_options": {},
    "database_short_lived_sessions": False,
    "database_create_tables_at_setup": True,
    # -- tasks -------------------------------------------------------------------------
    "accept_content": ["json"],
    "task_serializer": "json",
    "task_compression": None,
    "task_protocol": 2,
    "task_default_queue": "celery",
    "task_default_exchange": None,
    "task_default_exchange_type": "direct",
    "task_default_routing_key": None,
    "task_default_queue_type": "classic",
    "task_default_delivery_mode": 2,
    "task_default_priority": None,
    "task_default_rate_limit": None,
    "task_queue_max_priority": None,
    "task_queues": None,
    "task_routes": None,
    "task_create_missing_queues": True,
    "task_always_eager": False,
    "task_eager_propagates": False,
    "task_store_eager_result": False,
    "task_ignore_result": False,
    "task_store_errors_even_if_ignored": False,
    "task_track_started": False,
    "task_acks_late": False,
    "task_acks_on_failure_or_timeout": True,
    "task_reject_on_worker_lost": None,
    "task_time_limit": None,
    "task_soft_time_limit": None,
    "task_annotations": None,
    "task_publish_retry": True,
    "task_publish_retry_policy": {
        "max_retries": 3,
        "interval_start": 0.0,
        "interval_step": 0.2,
        "interval_max": 1.0,
    },
    "task_send_sent_event": False,
    "task_inherit_parent_priority": False,
    "task_remote_tracebacks": False,
    # -- worker ------------------------------------------------------------------------
    "worker_concurrency": None,
    "worker_pool": "threads",
    "worker_asyncio_uvloop": True,  # -P asyncio: use uvloop when it is installed
    "worker_prefetch_multiplier": 4,
    "worker_disable_prefetch": False,
    # The most bytes a task message's body may have, compressed or decompressed (a "zip
    # bomb" is rejected before it grows); None: no limit. Not a Celery setting.
    "worker_max_message_size": 128 * 1024 * 1024,
    # A message delivered this many times without being settled (each run lost the process
    # running it: a prefork child, or the worker) is not run again: FAILURE stored, the
    # message dead-lettered to <queue>.dead. None or 0: no limit (Celery's behaviour, which
    # redelivers it forever). Not a Celery setting. RabbitMQ's own x-delivery-limit on
    # quorum queues is the transport option "delivery_limit" (off: Celery would have to
    # declare the same queue arguments).
    "worker_delivery_limit": 10,
    "worker_disable_rate_limits": False,
    "worker_hijack_root_logger": True,
    "worker_log_color": None,
    "worker_log_format": "[%(asctime)s: %(levelname)s/%(processName)s] %(message)s",
    "worker_task_log_format": (
        "[%(asctime)s: %(levelname)s/%(processName)s] %(task_name)s[%(task_id)s]: %(message)s"
    ),
    "worker_redirect_stdouts": True,
    "worker_redirect_stdouts_level": "WARNING",
    "worker_send_task_events": False,
    "worker_soft_shutdown_timeout": 0.0,
    "worker_max_tasks_per_child": None,
    "worker_max_memory_per_child": None,
    "worker_eta_task_limit": None,
    "worker_state_db": None,
    "worker_timer_precision": 1.0,
    "worker_lost_wait": 10.0,
    "worker_direct": False,
    "worker_enable_remote_control": True,
    "worker_revoked_max": 50000,
    "worker_revoked_expires": 10800.0,
    "worker_revoked_sync_interval": 10.0,
    # -- remote control (pidbox) -------------------------------------------------------
    "control_exchange": "celery",
    "control_queue_ttl": 300.0,
    "control_queue_expires": 10.0,
    # -- events, time, modules ---------------------------------------------------------
    "event_serializer": "json",
    "event_queue_ttl": 5.0,
    "event_queue_expires": 60.0,
    "event_queue_prefix": "celeryev",
    "event_queue_exclusive": True,
    "event_queue_durable": False,
    "event_exchange": "celeryev",
    "worker_heartbeat_interval": 2.0,  # seconds between worker-heartbeat events (0: none)
    "worker_health_file": None,  # touched while the consumer loop makes progress
    "worker_health_port": None,  # HTTP liveness endpoint (200 healthy, 503 stalled)
    # Seconds without progress before the worker counts as stalled: its consumer loop does
    # not turn, or its pool holds work and starts or ends none (taskframe.worker.watchdog).
    "worker_health_timeout": 60.0,
    # Exit with code 75 once stalled, for systemd or Kubernetes to start a new worker.
    "worker_watchdog": False,
    "timezone": None,
    "enable_utc": True,
    "imports": (),
    "include": (),
}
