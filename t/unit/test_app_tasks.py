"""Tasks: registration, names, options, typing checks, eager runs, retries, hooks, signals."""

from __future__ import annotations

from typing import Any

import pytest

from taskframe import Task, Taskframe, shared_task, signals, states
from taskframe.errors import Ignore, MaxRetriesExceededError, NotRegistered


@pytest.fixture
def app() -> Taskframe:
    app = Taskframe("proj", broker="memory://tasks", backend="memory://", set_as_current=False)
    app.conf.task_always_eager = True
    return app


def test_default_name_and_registry(app: Taskframe) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    assert add.name == f"{__name__}.add"
    assert app.tasks[add.name] is add
    assert app.get_task(add.name) is add
    assert add(2, 3) == 5
    with pytest.raises(NotRegistered):
        app.get_task("nope")


def test_options_and_explicit_name(app: Taskframe) -> None:
    @app.task(name="custom.name", max_retries=7, acks_late=True, queue="q1")
    def f() -> None:
        return None

    assert f.name == "custom.name"
    assert (f.max_retries, f.acks_late, f.queue) == (7, True, "q1")
    with pytest.raises(TypeError, match="unknown task option"):
        app.task(nonsense=1)(lambda: None)


def test_typing_rejects_bad_arguments_at_send_time(app: Taskframe) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    with pytest.raises(TypeError, match="add"):
        add.delay(1, 2, 3)  # type: ignore[call-arg]


def test_eager_success_and_failure(app: Taskframe) -> None:
    @app.task
    def div(x: float, y: float) -> float:
        return x / y

    ok = div.delay(6, 3)
    assert (ok.state, ok.get()) == (states.SUCCESS, 2)
    bad = div.delay(1, 0)
    assert bad.state == states.FAILURE
    with pytest.raises(ZeroDivisionError):
        bad.get()
    assert isinstance(bad.get(propagate=False), ZeroDivisionError)
    assert "ZeroDivisionError" in (bad.traceback or "")


def test_eager_propagates(app: Taskframe) -> None:
    app.conf.task_eager_propagates = True

    @app.task
    def boom() -> None:
        raise KeyError("x")

    with pytest.raises(KeyError):
        boom.delay()


def test_bind_request_and_retry_until_success(app: Taskframe) -> None:
    seen: list[int] = []

    @app.task(bind=True, max_retries=3)
    def flaky(self: Task[Any, Any], n: int) -> int:
        seen.append(self.request.retries)
        assert self.request.is_eager
        if self.request.retries < n:
            raise self.retry(countdown=0)
        return self.request.retries

    assert flaky.delay(2).get() == 2
    assert seen == [0, 1, 2]


def test_retry_past_max_raises_the_cause(app: Taskframe) -> None:
    @app.task(bind=True, max_retries=1)
    def always(self: Task[Any, Any]) -> None:
        raise self.retry(exc=ValueError("nope"), countdown=0)

    with pytest.raises(ValueError, match="nope"):
        always.delay().get()

    @app.task(bind=True, max_retries=0)
    def no_cause(self: Task[Any, Any]) -> None:
        raise self.retry(countdown=0)

    with pytest.raises(MaxRetriesExceededError):
        no_cause.delay().get()


def test_autoretry_for(app: Taskframe) -> None:
    calls: list[int] = []

    @app.task(autoretry_for=(ConnectionError,), max_retries=4, retry_backoff=True,
              retry_jitter=False)
    def fetch() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise ConnectionError("down")
        return "ok"

    assert fetch.delay().get() == "ok"
    assert len(calls) == 3
    assert fetch.autoretry_countdown(3) == 8.0


def test_base_class_hooks(app: Taskframe) -> None:
    events: list[str] = []

    class Hooked(Task[Any, Any]):
        def before_start(self, task_id: str, args: Any, kwargs: Any) -> None:
            events.append("before")

        def on_success(self, retval: Any, task_id: str, args: Any, kwargs: Any) -> None:
            events.append(f"success:{retval}")

        def on_failure(self, exc: BaseException, task_id: str, args: Any, kwargs: Any,
                       einfo: str | None) -> None:
            events.append(f"failure:{type(exc).__name__}")

        def after_return(self, status: str, retval: Any, task_id: str, args: Any, kwargs: Any,
                         einfo: str | None) -> None:
            events.append(f"after:{status}")

    @app.task(base=Hooked)
    def maybe(fail: bool) -> int:
        if fail:
            raise RuntimeError("x")
        return 1

    maybe.delay(False)
    maybe.delay(True)
    assert events == ["before", "success:1", "after:SUCCESS",
                      "before", "failure:RuntimeError", "after:FAILURE"]


def test_ignore_stores_nothing(app: Taskframe) -> None:
    @app.task
    def skip() -> None:
        raise Ignore()

    assert skip.delay().state == states.IGNORED


def test_signals_fire_in_order(app: Taskframe) -> None:
    seen: list[str] = []

    @app.task
    def sig_task() -> int:
        return 42

    def prerun(sender: Any, **kw: Any) -> None:
        seen.append("prerun")

    def success(sender: Any, result: Any, **kw: Any) -> None:
        seen.append(f"success:{result}")

    def postrun(sender: Any, state: str, task_id: str, **kw: Any) -> None:
        # Still inside the request, as in Celery (sync and async bodies alike).
        assert sender.request.id == task_id
        seen.append(f"postrun:{state}")

    signals.task_prerun.connect(prerun, sender=sig_task)
    signals.task_success.connect(success, sender=sig_task)
    signals.task_postrun.connect(postrun, sender=sig_task)
    try:
        sig_task.delay()
    finally:
        signals.task_prerun.disconnect(prerun, sender=sig_task)
        signals.task_success.disconnect(success, sender=sig_task)
        signals.task_postrun.disconnect(postrun, sender=sig_task)
    assert seen == ["prerun", "success:42", "postrun:SUCCESS"]


def test_shared_task_joins_every_app() -> None:
    @shared_task
    def shared_mul(x: int, y: int) -> int:
        return x * y

    later = Taskframe("later", broker="memory://shared", set_as_current=False)
    assert later.tasks[shared_mul.name] is shared_mul
    assert shared_mul(3, 4) == 12


def test_signature_basics(app: Taskframe) -> None:
    @app.task
    def add(x: int, y: int) -> int:
        return x + y

    sig = add.s(2).set(queue="q")
    assert sig == {"task": add.name, "args": [2], "kwargs": {}, "options": {"queue": "q"},
                   "subtask_type": None, "immutable": False}
    assert add.si(1, 1).immutable
    assert sig.clone((3,)).args == [3, 2]  # Celery prepends
    assert sig.delay(5).get() == 7


def test_log_lines_of_a_task_carry_its_name_and_id(app: Taskframe) -> None:
    import io
    import logging

    from taskframe.log import TaskFormatter, get_task_logger

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(TaskFormatter("%(levelname)s %(message)s",
                                       "%(levelname)s %(task_name)s[%(task_id)s] %(message)s"))
    user_logger = logging.getLogger("user.module.logtest")
    user_logger.addHandler(handler)
    user_logger.setLevel(logging.INFO)
    task_logger = get_task_logger("logtest")
    task_logger.addHandler(handler)
    task_logger.setLevel(logging.INFO)

    @app.task
    def chatty() -> None:
        user_logger.info("from user code")
        task_logger.info("from the task logger")

    try:
        result = chatty.apply(task_id="abc-123")
        user_logger.info("outside")
    finally:
        user_logger.removeHandler(handler)
        task_logger.removeHandler(handler)
    assert result.successful()
    lines = stream.getvalue().splitlines()
    assert lines == [
        f"INFO {chatty.name}[abc-123] from user code",
        f"INFO {chatty.name}[abc-123] from the task logger",
        "INFO outside",
    ]


def test_retry_with_throw_false_returns_and_the_run_goes_on(app: Taskframe) -> None:
    from taskframe.errors import Retry

    app.conf.task_always_eager = False
    got: list[object] = []

    @app.task(bind=True)
    def soft(self: Task[Any, Any]) -> str:
        with pytest.raises(RuntimeError):  # called directly: retry() refuses
            self.retry(exc=RuntimeError("direct"), throw=False)
        return "ran"

    assert soft() == "ran"
    ctx_task = soft
    from taskframe.context import Context, request_context

    ctx = Context(id="r1", task=ctx_task.name, called_directly=False, is_eager=True)
    with request_context(ctx):
        value = ctx_task.retry(countdown=0, throw=False)
        got.append(value)
    assert isinstance(got[0], Retry)


def test_no_backend_warning_points_at_the_caller() -> None:
    app = Taskframe("warn", broker="memory://warn", set_as_current=False)

    @app.task
    def noted() -> None:
        return None

    with pytest.warns(RuntimeWarning, match="no result_backend") as record:
        noted.delay()
    assert record[0].filename == __file__


def test_autodiscover_tasks(tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    pkg = tmp_path / "discpkg"
    (pkg / "withtasks").mkdir(parents=True)
    (pkg / "without").mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "withtasks" / "__init__.py").write_text("")
    (pkg / "without" / "__init__.py").write_text("")
    (pkg / "withtasks" / "tasks.py").write_text(
        "from taskframe import shared_task\n\n@shared_task\ndef found():\n    return 1\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    app = Taskframe("disc", broker="memory://disc", set_as_current=False)
    imported = app.autodiscover_tasks(["discpkg.withtasks", "discpkg.without"])
    assert imported == ["discpkg.withtasks.tasks"]
    assert "discpkg.withtasks.tasks.found" in app.tasks
