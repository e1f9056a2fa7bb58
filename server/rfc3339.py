"""Timestamps as RFC 3339 text in UTC, the one spelling manifests, key files and the audit log use."""

from __future__ import annotations

import datetime as dt


def format_utc(moment: dt.datetime, fraction: bool = False) -> str:
    """'2025-01-31T12:00:00Z' (with `fraction`, microseconds too: '...:00.123456Z'); a naive
    datetime is taken as UTC."""
    moment = moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)
    return moment.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ" if fraction else "%Y-%m-%dT%H:%M:%SZ")


def now_utc(fraction: bool = False) -> str:
    """The current time, as `format_utc` writes it."""
    return format_utc(dt.datetime.now(dt.UTC), fraction)
