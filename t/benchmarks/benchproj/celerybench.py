"""The benchmark tasks on a Celery app (``celery -A celerybench worker``)."""

from __future__ import annotations

import benchtasks
from celery import Celery

app = Celery("celerybench", set_as_current=False)
app.conf.update(benchtasks.settings())

noop = app.task(name="bench.noop", ignore_result=True)(benchtasks.noop)
echo = app.task(name="bench.echo")(benchtasks.echo)
mark = app.task(name="bench.mark", ignore_result=True)(benchtasks.mark)
sleep = app.task(name="bench.sleep", ignore_result=True)(benchtasks.sleep)
