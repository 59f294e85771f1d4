"""Number-format conversions applied after the method passes (``--precision``)."""
