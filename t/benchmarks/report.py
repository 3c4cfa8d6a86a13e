"""The ratio tables ``run.py`` prints from ``Bench.results``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

Cell = dict[str, Any]
MIB = 1024 * 1024


def _num(cell: Cell | None, key: str) -> float | None:
    if not cell or key not in cell:
        return None
    return float(cell[key])


def _show(cell: Cell | None, key: str, fmt: str, scale: float = 1.0) -> str:
    """A figure, or why there is none (n/a ..., error)."""
    if cell is None:
        return "-"
    if "na" in cell:
        return str(cell["na"])
    if "error" in cell:
        return "error"
    value = _num(cell, key)
    return "-" if value is None else format(value / scale, fmt)


def _ratio(a: float | None, b: float | None) -> str:
    if a is None or b is None or b == 0:
        return "-"
    return f"{a / b:.2f}x"


def _table(title: str, header: list[str], rows: list[list[str]]) -> None:
    print(f"\n{title}")
    if not rows:
        print("  (nothing run)")
        return
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    for line in [header, *rows]:
        cells = [c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths,
                                                                                   strict=True))]
        print("  " + "  ".join(cells).rstrip())


Build = Callable[[Cell | None, Cell | None, dict[str, Any]], list[str]]


def _rows(results: list[dict[str, Any]], build: Build) -> list[list[str]]:
    return [[r["broker"], r["pool"], str(r["concurrency"]),
             *build(r.get("taskframe"), r.get("celery"), r)] for r in results]


def print_report(meta: dict[str, Any], results: dict[str, Any]) -> None:
    """Print one table per workload that ran."""
    print(f"\n{meta['host']}, {meta['cpus']} CPUs, Python {meta['python']}; taskframe "
          f"{meta['versions']['taskframe']}, celery {meta['versions']['celery']}, kombu "
          f"{meta['versions']['kombu']}. Ratios are taskframe / Celery.")
    if "drain" in results:
        _drain(meta, results)
    if "sleep" in results:
        def sleep(tf: Cell | None, ce: Cell | None, row: dict[str, Any]) -> list[str]:
            ideal = (_num(tf, "ideal_seconds") or _num(ce, "ideal_seconds"))
            return [_show(tf, "seconds", ".2f"), _show(ce, "seconds", ".2f"),
                    "-" if ideal is None else f"{ideal:.2f}",
                    _ratio(_num(tf, "tasks_per_s"), _num(ce, "tasks_per_s"))]
        _table(f"(b) {meta['sleep_tasks']:,} tasks sleeping 100 ms: seconds from the first task "
               "to the last done (lower is better; ratio of tasks/s, higher is better)",
               ["broker", "pool", "-c", "taskframe s", "celery s", "ideal s", "tf/celery"],
               _rows(results["sleep"], sleep))
    if "latency" in results:
        def latency(tf: Cell | None, ce: Cell | None, row: dict[str, Any]) -> list[str]:
            return [_show(tf, "p50_ms", ".2f"), _show(ce, "p50_ms", ".2f"),
                    _ratio(_num(tf, "p50_ms"), _num(ce, "p50_ms")),
                    _show(tf, "p99_ms", ".2f"), _show(ce, "p99_ms", ".2f"),
                    _ratio(_num(tf, "p99_ms"), _num(ce, "p99_ms"))]
        _table(f"(c) {meta['latency_calls']} sequential .delay().get() round trips, Redis result "
               "backend, ms (lower is better)",
               ["broker", "pool", "-c", "tf p50", "celery p50", "p50 tf/celery", "tf p99",
                "celery p99", "p99 tf/celery"], _rows(results["latency"], latency))
    if "rss" in results:
        def rss(tf: Cell | None, ce: Cell | None, row: dict[str, Any]) -> list[str]:
            procs = "/".join("-" if _num(c, "processes") is None else _show(c, "processes", ".0f")
                             for c in (tf, ce))
            return [_show(tf, "rss", ".1f", MIB), _show(ce, "rss", ".1f", MIB),
                    _ratio(_num(tf, "rss"), _num(ce, "rss")),
                    _show(tf, "pss", ".1f", MIB), _show(ce, "pss", ".1f", MIB), procs]
        _table("(d) idle worker memory, MiB, summed over the worker and its pool processes, "
               "3 s after its first task (lower is better)",
               ["broker", "pool", "-c", "tf RSS", "celery RSS", "RSS tf/celery", "tf PSS",
                "celery PSS", "processes tf/celery"], _rows(results["rss"], rss))


def _drain(meta: dict[str, Any], results: dict[str, Any]) -> None:
    raw = {r["broker"]: r for r in results.get("raw", [])}

    def drain(tf: Cell | None, ce: Cell | None, row: dict[str, Any]) -> list[str]:
        floor = raw.get(row["broker"])
        return [_show(tf, "tasks_per_s", ",.0f"), _show(ce, "tasks_per_s", ",.0f"),
                _ratio(_num(tf, "tasks_per_s"), _num(ce, "tasks_per_s")),
                _show(tf, "steady_per_s", ",.0f"), _show(ce, "steady_per_s", ",.0f"),
                _ratio(_num(tf, "steady_per_s"), _num(ce, "steady_per_s")),
                _show(floor, "tasks_per_s", ",.0f"),
                _ratio(_num(tf, "tasks_per_s"), _num(floor, "tasks_per_s")),
                _ratio(_num(tf, "steady_per_s"), _num(floor, "tasks_per_s"))]

    _table(f"(a) drain {meta['n']:,} no-op tasks, tasks/s (higher is better). total: worker "
           "spawn -> last task; steady: first task -> last task; raw: bare client, same "
           "messages",
           ["broker", "pool", "-c", "tf total", "celery total", "tf/celery", "tf steady",
            "celery steady", "steady tf/celery", "raw", "tf/raw", "steady tf/raw"],
           _rows(results["drain"], drain))
    for r in results.get("raw", []):
        if "message_bytes" in r:
            what = "envelope" if r["broker"] == "redis" else "body (task in headers)"
            print(f"  raw floor {r['broker']}: {r['tasks_per_s']:,.0f} msg/s, the same task "
                  f"messages, {r['message_bytes']} bytes of {what} each")
