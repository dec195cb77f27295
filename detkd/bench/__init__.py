"""``detkd bench``: every method on one teacher / student pair and seeds, one table (:mod:`detkd.bench.run`)."""

from detkd.bench.run import (
    BenchConfig,
    BenchError,
    BenchMethod,
    BenchRun,
    execute,
    load_bench,
    plan_runs,
    run_bench,
    write_report,
)

__all__ = ["BenchConfig", "BenchError", "BenchMethod", "BenchRun", "execute", "load_bench", "plan_runs",
           "run_bench", "write_report"]
