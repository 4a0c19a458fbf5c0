"""Where paths meet operations: one module per command, an options object in, a report out.

A command module resolves its inputs (paths, Hub ids), checks them, opens them through
:mod:`loratools.io`, runs the pure operation from :mod:`loratools.ops`, and returns the report the
CLI renders; every command does (docs/design.md, "Where each kind of change goes").
"""
