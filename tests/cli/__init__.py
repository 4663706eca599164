"""The ``gradtrace`` command: its outputs, its errors, and ``gradtrace demo``."""
