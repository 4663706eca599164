"""The weight-sync budget (gradtrace.sync) in real runs."""
