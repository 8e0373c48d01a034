"""WISP's benchmarks, each a module run from the repository root:

* ``python -m benchmarks.round_cost``: server time per verification round against a plain decode step;
* ``python -m benchmarks.draft_quality``: the default draft's agreement, tokens per round and cost;
* ``python -m benchmarks.policies``: goodput and SLO attainment of wisp, sled, fcfs and centralized serving;
* ``python -m benchmarks.estimator``: the verification time estimator's error;
* ``python -m benchmarks.gpu_calibration``: the modeled-GPU cost model against step times measured on a GPU.

Each writes ``benchmarks/results/<name>.json`` and ``<name>.png`` (another folder: set ``WISP_BENCH_RESULTS``)
and prints a table. `benchmarks.common` holds the defaults they share, `benchmarks.report` what they output.
"""
