"""Teacher LLMs for SFT data: an OpenAI-compatible async client and a crash-tolerant attempt store.

Importing this package is cheap: ``openai`` is only imported when the first request is sent.
"""

from cellduality.teacher.client import (
    MissingAPIKeyError,
    RetryPolicy,
    TeacherClient,
    TeacherConfigError,
    TeacherEndpoint,
    TeacherRequest,
    TeacherResult,
    choose_teacher,
    parse_retry_after,
    redact_url,
    run_teacher_batch,
)
from cellduality.teacher.store import FAILED, KEPT, REJECTED, AttemptRecord, AttemptStore, StoreLockedError

__all__ = [
    "FAILED",
    "KEPT",
    "REJECTED",
    "AttemptRecord",
    "AttemptStore",
    "MissingAPIKeyError",
    "RetryPolicy",
    "StoreLockedError",
    "TeacherClient",
    "TeacherConfigError",
    "TeacherEndpoint",
    "TeacherRequest",
    "TeacherResult",
    "choose_teacher",
    "parse_retry_after",
    "redact_url",
    "run_teacher_batch",
]
