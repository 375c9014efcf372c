"""The run report: read a run's files (`run_files`), draw its curves (`plots`), lay out one HTML page (`page`).

The sample rounds' grid is `sample_grid`; `build.write_report` puts the page together and is what callers import;
`python -m pipeline.report` is the command line. Nothing here imports the model, data or training code: a report is
built from what a run wrote to disk, so it works on a finished run, a running one, or a copy of either on a laptop.
"""

from pipeline.reporting.build import DEFAULT_MAX_ROUNDS, REPORT_NAME, write_report

__all__ = ["DEFAULT_MAX_ROUNDS", "REPORT_NAME", "write_report"]
