"""``gradtrace demo``: tiny local model and data (:mod:`.tiny`), the runs (:mod:`.runs`) and the pipeline
that trains, compares and reports them (:mod:`.pipeline`). A top room: it may import any other."""
