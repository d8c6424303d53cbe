"""Studies as folders: `experiments/<study>/sweep.py` lists runs over the one training loop; this
package runs them (`python -m ssm_lab.experiments run <study>`), records one JSON result per run and
rebuilds each study's figures and README table from those results."""

from ssm_lab.experiments.report import plot_study, table_study
from ssm_lab.experiments.results import (best_over, load_results, markdown_table, pivot,
                                         rewrite_readme_table)
from ssm_lab.experiments.runner import run_study, select, status, sweep_groups
from ssm_lab.experiments.study import (Run, Study, available_letters, experiments_dir, find_studies,
                                       get_study, load_file, set_mixer, sweep_config)

__all__ = [
    "Run", "Study", "available_letters", "best_over", "experiments_dir", "find_studies", "get_study",
    "load_file", "load_results", "markdown_table", "pivot", "plot_study", "rewrite_readme_table",
    "run_study", "select", "set_mixer", "status", "sweep_config", "sweep_groups", "table_study",
]
