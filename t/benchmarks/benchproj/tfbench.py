"""The benchmark tasks on a taskframe app (``taskframe -A tfbench worker``)."""

from __future__ import annotations

import benchtasks

from taskframe import Taskframe

app = Taskframe("tfbench", set_as_current=False)
app.conf.update(benchtasks.settings())

noop = app.task(name="bench.noop", ignore_result=True)(benchtasks.noop)
echo = app.task(name="bench.echo")(benchtasks.echo)
mark = app.task(name="bench.mark", ignore_result=True)(benchtasks.mark)
sleep = app.task(name="bench.sleep", ignore_result=True)(benchtasks.sleep)
asleep = app.task(name="bench.asleep", ignore_result=True)(benchtasks.asleep)
