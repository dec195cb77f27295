"""``detkd bench``: every method on the same teacher / student pair, same data, same budget, one table.

A bench file names a student config, a teacher config and the methods to compare. The bench trains the
teacher once (or evaluates a given checkpoint), then for every seed:

1. ``pretrain`` (when ``pretrain_epochs > 0``): the student alone for ``pretrain_epochs``. Every run of
   the seed starts from this checkpoint, as the papers start distillation from a trained student
   (an ImageNet-pretrained one in their case);
2. ``baseline``: the student alone for ``epochs`` more, from that start;
3. one run per method, distilled for ``epochs`` from the same start, same data order;
4. ``fair_budget`` (when ``pretrain_epochs > 0``): the student alone for ``pretrain_epochs + epochs`` in
   one schedule from scratch, as many student epochs as pre-training plus distillation.

Each run is a ``detkd train`` / ``detkd distill`` subprocess (its peak memory is its own, a crash stays
in its log) with its config written to ``RUN/run.yaml``. A finished run writes ``RUN/result.json``
atomically; running the bench again skips finished runs and resumes an interrupted one from its
``last.pt``. After every run the bench rewrites ``table.md``, ``table.csv``, ``results.json``,
``map.png`` (mAP per method, error bars over seeds) and ``curves.png`` (loss and mAP of every run).
"""

from detkd.bench.plan import plan_runs
from detkd.bench.report import write_report
from detkd.bench.run import execute, run_bench
from detkd.bench.spec import BenchConfig, BenchMethod, BenchRun, load_bench
from detkd.errors import BenchError

__all__ = ["BenchConfig", "BenchError", "BenchMethod", "BenchRun", "execute", "load_bench", "plan_runs",
           "run_bench", "write_report"]
