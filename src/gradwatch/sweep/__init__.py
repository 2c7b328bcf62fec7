"""Sweeps: many specs trained fast, each Run stored as it finishes, stored ones reused.

A folder of one job each, in the order a sweep runs:

- ``grid``: a study file (base spec, grid and/or list over any spec field) validated whole into a
  ``Study`` before any run starts, and refused above ``MAX_RUNS`` from its size alone;
- ``run``: the engine: ``run_study`` reuses stored runs (labelling them into the study's group),
  trains the rest with ``run_many`` and commits each run in its own transaction, so a sweep killed
  at any moment resumes without losing or repeating a run;
- ``local``: ensembles by layer shape (``chunks``, ``train_chunk``) in this process or over spawned
  workers, and ``run_each`` (one ``train`` per job: the demo's path);
- ``cluster``: the same ensembles as Ray tasks, on a ``ray start`` cluster or a local Ray;
- ``tables``: a study's medians table and the runs its report draws.

The built-in studies (``gradwatch.studies``) run through the same ``run_study``, one Study per stage.
"""

from gradwatch.sweep.grid import CHUNK, MAX_RUNS, Job, Study, cases, json_value, label, load_study, study
from gradwatch.sweep.local import chunks, keep_memory, run_each, train_chunk, workers
from gradwatch.sweep.run import BACKENDS, Outcome, check_memory, preflight, run_many, run_study
from gradwatch.sweep.tables import report_runs, summarize

__all__ = ["BACKENDS", "CHUNK", "MAX_RUNS", "Job", "Outcome", "Study", "cases", "check_memory", "chunks",
           "json_value", "keep_memory", "label", "load_study", "preflight", "report_runs", "run_each", "run_many",
           "run_study", "study", "summarize", "train_chunk", "workers"]
