"""What the tests share: tiny models and data, references, launching processes, local servers, store readers.

Test modules import from here (and get fixtures from ``tests/conftest.py``), never from one another;
``tests/test_layout.py`` checks it.
"""
