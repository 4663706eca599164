"""The callback and ``trace()`` inside real trainers and loops: transformers, TRL, accelerate, the run
lifecycle, the examples and the demo's plumbing."""
