"""Metering for the online server: API keys, per-key usage counters and per-key row quotas.

A re-export of the pieces, which live in their own modules: ``keys`` (API keys), ``usage``
(usage counters and reports), ``quota`` (the per-key token bucket) and ``db`` (the shared
SQLite file). Import from here or from those modules.
"""

from mms_core.errors import MeteringError
from mms_core.serving.metering.db import ANONYMOUS, metering_path
from mms_core.serving.metering.keys import ApiKey, KeyStore
from mms_core.serving.metering.quota import QuotaLimiter
from mms_core.serving.metering.usage import UsageMeter, UsageRow, usage_report

__all__ = [
    "ANONYMOUS",
    "ApiKey",
    "KeyStore",
    "MeteringError",
    "QuotaLimiter",
    "UsageMeter",
    "UsageRow",
    "metering_path",
    "usage_report",
]
