"""Reports of an evaluation: one self-contained HTML page (`page.write_report`, plots from `plots`) and a
terminal table (`tables.render_table`).

Both read only the evaluation document (`workers.evaluation.evaluate.evaluate_runs`, plain JSON), so a
report can be re-rendered later from the stored result.
"""
from __future__ import annotations

from workers.evaluation.report.page import write_report
from workers.evaluation.report.plots import (plot_calibration, plot_confusions, plot_judge, plot_loss,
                                             plot_per_class_f1, plot_time_to_accuracy)
from workers.evaluation.report.tables import (judge_summaries, judge_validity_lines, model_names, per_class_rows,
                                              render_table, summary_rows)

__all__ = ["judge_summaries", "judge_validity_lines", "model_names", "per_class_rows", "plot_calibration",
           "plot_confusions", "plot_judge", "plot_loss", "plot_per_class_f1", "plot_time_to_accuracy",
           "render_table", "summary_rows", "write_report"]
