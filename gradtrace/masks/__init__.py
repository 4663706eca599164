"""The mask toolkit, after (or beside) a run: post-hoc checkpoint diff (:mod:`.diff`), overlap between
runs (:mod:`.overlap`), update rank (:mod:`.rank`) and training the subnetwork alone
(:mod:`.subnetwork`).

Works on files (checkpoints, masks), not on a live tracker. May import :mod:`gradtrace.formats` and
:mod:`gradtrace.anatomy`.
"""
