"""Command line of the study runner.

  python -m ssm_lab.experiments list
  python -m ssm_lab.experiments run <study> [--only PATTERN] [--budget_s S] [--out DIR] [--dry_run]
      [--vmap auto|on|off]
  python -m ssm_lab.experiments plot <study> [--plot_dir DIR]
  python -m ssm_lab.experiments table <study> [--readme PATH | --print_only]

`--smoke` selects a study's CPU-sized sweep; its results go under `<out>/smoke/<study>/results` and its
plots to a temporary folder, so smoke runs never write into the repository.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile

from ssm_lab.experiments import report, runner
from ssm_lab.experiments.study import ENV_DIR, experiments_dir, find_studies, get_study


def _parser() -> argparse.ArgumentParser:
  common = argparse.ArgumentParser(add_help=False)
  common.add_argument("--experiments_dir", help=f"where studies live (default ${ENV_DIR} or the "
                      "repository's experiments/)")
  common.add_argument("--smoke", action="store_true", help="the study's CPU-sized smoke sweep")
  common.add_argument("--out", default=None, help=f"root of run workdirs (default {runner.DEFAULT_OUT})")
  common.add_argument("--results_dir", default=None, help="result JSONs (default "
                      "experiments/<study>/results; <out>/smoke/<study>/results with --smoke)")
  parser = argparse.ArgumentParser(prog="python -m ssm_lab.experiments", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  sub = parser.add_subparsers(dest="command", required=True)
  sub.add_parser("list", parents=[common], help="studies with their counts of runs, done, failed")
  run = sub.add_parser("run", parents=[common], help="train the pending runs of a study")
  run.add_argument("study")
  run.add_argument("--only", help="comma-separated globs over run names, or re:REGEX")
  run.add_argument("--budget_s", type=float, default=None,
                   help="start no run after S seconds, nor one the mean run time says would overrun")
  run.add_argument("--dry_run", action="store_true", help="list what would run")
  run.add_argument("--skip_failed", action="store_true", help="do not retry runs that failed")
  run.add_argument("--vmap", choices=("auto", "on", "off"), default="auto",
                   help="train the runs that differ only in learning rate and seed as one vmapped "
                   "population (auto: on for accelerators, off on CPU)")
  plot = sub.add_parser("plot", parents=[common], help="redraw a study's figures from its results")
  plot.add_argument("study")
  plot.add_argument("--plot_dir", help="default: the study folder (a temporary folder with --smoke)")
  table = sub.add_parser("table", parents=[common], help="rebuild the study README's results table")
  table.add_argument("study")
  table.add_argument("--readme", help="README to rewrite (default: the study's; none with --smoke)")
  table.add_argument("--print_only", action="store_true", help="print the table, write nothing")
  return parser


def _compilation_cache(out: str) -> None:
  """A persistent XLA cache under `out`, so an early-stopping run's later segments and reruns of a
  sweep do not compile again (unless $JAX_COMPILATION_CACHE_DIR already names one)."""
  if os.environ.get("JAX_COMPILATION_CACHE_DIR"):
    return
  import jax  # noqa: PLC0415

  jax.config.update("jax_compilation_cache_dir", os.path.abspath(os.path.join(out, "jax_cache")))


def main(argv: list[str] | None = None) -> int:
  # Grow GPU memory on demand instead of taking 75% up front: measurement units run their points in
  # child processes (experiments/scaling), which need the device's memory for themselves.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
  args = _parser().parse_args(argv)
  if args.command == "list":
    studies = find_studies(args.experiments_dir)
    print(f"studies in {experiments_dir(args.experiments_dir)}:")
    for name, study in studies.items():
      counts = runner.status(study, smoke=args.smoke, out=args.out, results_dir=args.results_dir)
      print(f"  {name:20s} {counts['runs']:5d} runs  {counts['done']:5d} done  "
            f"{counts['failed']:5d} failed")
    return 0
  study = get_study(args.study, args.experiments_dir)
  paths = runner.Paths.for_study(study, smoke=args.smoke, out=args.out, results_dir=args.results_dir)
  if args.command == "run":
    _compilation_cache(args.out or runner.DEFAULT_OUT)
    summary = runner.run_study(study, smoke=args.smoke, only=args.only, budget_s=args.budget_s,
                               out=args.out, results_dir=args.results_dir, dry_run=args.dry_run,
                               retry_failed=not args.skip_failed,
                               vmap={"on": True, "off": False}.get(args.vmap, "auto"))
    return 1 if summary["failed"] else 0
  if args.command == "plot":
    out_dir = args.plot_dir or (tempfile.mkdtemp(prefix=f"{study.name}_plots_") if args.smoke
                                else study.path)
    for path in report.plot_study(study, paths.results, out_dir):
      print(f"wrote {path}")
    return 0
  readme = None if args.print_only else args.readme or (None if args.smoke else study.readme)
  print(report.table_study(study, paths.results, readme))
  if readme:
    print(f"rewrote the results table of {readme}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
