"""What can go wrong while judging, as the job handles it.

- `JudgeUnavailable`: transient (connection refused, timeout, 5xx, a broken stream): retried with backoff,
  then the item is recorded unscored with the failure's `kind`.
- `JudgeFatal` (and `JudgeModelMissing`): nothing can be judged: the whole job stops, saying what to do.
- `JudgeError`: any other failure of one request: not retried, the item is recorded unscored.
- `Unscorable`: the judge answered, but no score could be read from the answer (the item is unscored).
- `JudgeInputError`: the job's inputs cannot be judged at all.

Each backend translates its client's exceptions into these (`OllamaJudge._translate`,
`OpenAIJudge._translate`, both by the HTTP rule `is_transient_status`), so `judge_items` never needs to
know which client it talks to.
"""
from __future__ import annotations


class JudgeError(RuntimeError):
    """The judge could not answer one request (not retried; the item is recorded unscored)."""

    kind = "judge_error"


class JudgeUnavailable(JudgeError):
    """A transient failure (connection refused, timeout, 5xx): retried with backoff."""

    kind = "unavailable"

    def __init__(self, message: str, kind: str = "unavailable") -> None:
        super().__init__(message)
        self.kind = kind


class JudgeFatal(JudgeError):
    """Nothing can be judged (model missing, key refused): the whole job stops, saying what to do."""

    kind = "fatal"


class JudgeModelMissing(JudgeFatal):
    """The judge model is not on the server."""

    kind = "model_missing"


class JudgeInputError(ValueError):
    """The job's inputs cannot be judged (not a generate-mode classify job, no responses, ...)."""


class Unscorable(ValueError):
    """The judge answered, but no score could be read from the answer."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


TRANSIENT_STATUS = (408, 429)  # request timeout, too many requests: worth a retry, like every 5xx


def is_transient_status(status_code: int) -> bool:
    """Whether an HTTP status from a judge server means "try again" (JudgeUnavailable) rather than "this
    request was refused" (JudgeError): every 5xx, 408 and 429."""
    return status_code >= 500 or status_code in TRANSIENT_STATUS
