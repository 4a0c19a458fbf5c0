"""The ``loratools`` command line: one click command per file, rendered by :mod:`render`."""
