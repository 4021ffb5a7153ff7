"""The two kinds of failure a user sees: each is printed as one line and maps to an exit status."""
import re

_ANSI = re.compile(r"\x1b\[[0-9;]*m")
_EXCEPTION_LINE = re.compile(r"^([A-Za-z_][\w.]*(?:Error|Exception|Exit))(?:\([\w.]+\))?: (.+)$")
_ACTOR_DIED = "The actor died"  # Ray's ActorDiedError: a generic first line, the actor's details, then why


class PipelineError(Exception):
    """A failure reported to the user as one line (no traceback); ``exit_code`` is the process status."""

    exit_code = 1


class UsageError(PipelineError):
    """Bad flags, a bad input or an output-directory conflict, found before any actor starts."""

    exit_code = 2


class JobFailed(PipelineError):
    """The job started but cannot go on (actors cannot start, results cannot be written, ...).

    Shards already written stay on disk; the message says so and how to resume.
    """

    exit_code = 1


def one_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message, without terminal colours."""
    for line in _ANSI.sub("", str(exc)).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__


def root_cause(exc: BaseException) -> str:
    """One line naming the original exception behind a Ray error (whose text embeds the remote traceback):
    ``"ValueError: ..."``; for an actor that died, Ray's reason (``"The actor died because its node has died.
    Node Id: ..."``); else Ray's own first line."""
    cause = getattr(exc, "cause", None)
    if isinstance(cause, BaseException) and cause is not exc and type(cause).__module__.split(".")[0] != "ray":
        return f"{type(cause).__name__}: {one_line(cause)}"
    lines = _ANSI.sub("", str(exc)).splitlines()
    for line in reversed(lines):
        match = _EXCEPTION_LINE.match(line.strip())
        if match:
            return f"{match.group(1)}: {match.group(2)}"
    reasons = [line.strip() for line in lines[1:] if line.startswith(_ACTOR_DIED)]
    return reasons[0] if reasons else one_line(exc)
