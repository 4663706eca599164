"""The views of a run: ``gradtrace report`` (HTML, PNGs), ``gradtrace watch``, and both in a real browser."""
