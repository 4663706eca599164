"""The bottom room: the plain-data formats every other room reads and writes.

The masks file (:mod:`.masks_file`, bit-packed with :mod:`.bitpack`), the local run log
(:mod:`.run_log`), the names of a run directory's files (:mod:`.run_dir`) and atomic writes
(:mod:`.atomic`). Imports nothing of gradtrace outside this package.
"""
