"""RWJS now lives in :mod:`cellduality.rwjs` (below ``tasks`` and ``rewards``); this name is kept so
existing imports work."""

from cellduality.rwjs import rwjs  # noqa: F401
