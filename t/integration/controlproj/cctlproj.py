"""The remote-control test project (Celery side): same settings as ``ctlproj``."""

from __future__ import annotations

import os

from celery import Celery

app = Celery("cctlproj", broker=os.environ["CTL_BROKER"],
             backend=os.environ.get("CTL_CELERY_BACKEND") or None)
app.conf.update(
    control_exchange=os.environ.get("CTL_NS", "celery"),
    task_default_queue=os.environ.get("CTL_QUEUE", "celery"),
    broker_connection_retry_on_startup=True,
)


@app.task(name="ctl.add")
def add(x: int, y: int) -> int:
    return x + y
