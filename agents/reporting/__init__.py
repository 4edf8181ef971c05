"""Reports from run folders: the GPR Table 3 / 4 / 5 analogues, the final and pre-training tables, their
markdown and figures. ``agents.plots`` is the entry point that writes them; notebooks call them directly.

| module | what |
|---|---|
| ``keys`` | the metric keys the tables read (``strata_key``, ``TABLE4``, ``STRATA_METRICS``, ``BASELINE``...) |
| ``folders`` | reading ``agents.hepo``, ``agents.evaluate`` and ``agents.pretrain`` folders back |
| ``tables`` | the tables (mean over seeds, t interval over seeds) and their markdown (``estimate_cell``, ``change_cell``) |
| ``figures`` | curves with seed bands, table bars, pre-training curves (matplotlib, Agg) |
| ``report`` | ``write_report``: every table and figure into one folder |
"""
