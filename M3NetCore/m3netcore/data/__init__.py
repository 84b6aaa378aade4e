"""Data: generated CTs for the demo and tests (LIDC and caches come with the data issue)."""
