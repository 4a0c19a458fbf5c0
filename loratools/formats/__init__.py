"""Adapter formats: key names and configs ↔ :class:`loratools.adapter.Adapter`. No file I/O here."""
