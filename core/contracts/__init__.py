"""Typed contracts: every file or row that one part of newslora writes and another reads.

Each has one owner model here, with a `format_version`, and is built and parsed nowhere else:

| contract | model | where it lives |
|---|---|---|
| dataset meta | `dataset.DatasetMeta` | `<dataset>/meta.json` |
| adapter meta | `adapter.AdapterMeta` | `<adapter>/newslora.json` |
| training metrics | `metrics.MetricsRow` | `<run>/metrics.jsonl`, one row per step or eval |
| predictions | `prediction.PredictionRow` | table `predictions` |
| judge rows | `judge.JudgeRow` | table `judge_scores` |
| evaluation results | `evaluation.EvaluationDoc` | table `evaluations` (`document`) |
| classify results | `results.ClassifyResult` | `jobs.result` of a classify job |
| training results | `train.TrainResult` | `jobs.result` of a train job (both backends) |
| judge summaries | `judge.JudgeSummary` | a judge job's summary, inside evaluation documents |
| export manifest | `export.ExportManifest` | `<export>/export.json` |
"""
