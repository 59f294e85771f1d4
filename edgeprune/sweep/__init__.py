"""``edgeprune sweep``: every setting of a grid rewritten, evaluated and timed, then tabled.

``settings`` (the grid, checked against the model), ``store`` (the resumable output
directory), ``run`` (the work queue over one or more boards), ``table`` (table, plot and the
recommended setting). The library call behind the command is :func:`edgeprune.sweep.run.run_sweep`
followed by :func:`edgeprune.sweep.table.build_table` / ``write_outputs``.
"""
