"""Reading a run's records into tables and plots; depends on the record schema only."""

from analysis.tables import (
    accuracy_by_iteration,
    load_run,
    markdown,
    summary_table,
    write_summary,
)

__all__ = ["accuracy_by_iteration", "load_run", "markdown", "summary_table", "write_summary"]
