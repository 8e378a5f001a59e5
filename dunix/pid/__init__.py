"""Structured ids: gpids, node ids and per-node PID ranges."""

from dunix.pid.gpid import (
    MAX_NODE_ID,
    NODE_BITS,
    PID_BITS,
    RANGE_SIZE,
    PidRange,
    PidRangeAllocator,
    make_gpid,
    parse_gpid,
    split_gpid,
)

__all__ = [
    "MAX_NODE_ID",
    "NODE_BITS",
    "PID_BITS",
    "RANGE_SIZE",
    "PidRange",
    "PidRangeAllocator",
    "make_gpid",
    "parse_gpid",
    "split_gpid",
]
