"""Views of a run for people: a run as plain data, its grids and table rows (:mod:`.run_data`), the HTML
report and its figures (:mod:`.report`), the live images drawn once per logging step (:mod:`.raster`,
:mod:`.live`), the live terminal dashboard (:mod:`.watch`).

They read only what a run left on disk (the run log, ``summary.json``) or a summary dict, never the
tracker. May import :mod:`gradtrace.formats` and :mod:`gradtrace.anatomy`.
"""
