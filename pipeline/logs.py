"""Actor-side logging: every line an actor's engine or pipeline code logs carries the actor's id.

Actor stdout/stderr land in Ray's per-actor log files (the dashboard's actor logs, ``ray.util.state.get_log``)
and are forwarded to the driver's console, where Ray prefixes them with the actor's ``repr``.
"""
import logging
import sys

FORMAT = "[%(asctime)s] [%(name)s] [%(levelname)s] %(message)s"
DATEFMT = "%Y-%m-%d %H:%M:%S"


class ActorTag(logging.Filter):
    """Prefix the messages of logger ``name`` (and its children) with ``[actor-id]``, once, however many tagged
    handlers see them; other loggers' records pass through a tagged handler unchanged."""

    def __init__(self, actor_id: str, name: str):
        super().__init__(name)
        self.prefix = f"[{actor_id}] "

    def filter(self, record: logging.LogRecord) -> bool:
        if super().filter(record) and not getattr(record, "actor_tagged", False):
            record.msg = f"{self.prefix}{record.msg}"
            record.actor_tagged = True
        return True


def tag_logger(name: str, actor_id: str) -> None:
    """Tag the lines of logger ``name``: on its own handlers, or the root's when it has none (propagates)."""
    logger = logging.getLogger(name)
    for handler in logger.handlers or logging.getLogger().handlers:
        if not any(isinstance(f, ActorTag) and f.name == name for f in handler.filters):
            handler.addFilter(ActorTag(actor_id, name))


def actor_logger(actor_id: str, level: str) -> logging.Logger:
    """The pipeline's logger inside an actor: stderr, the engine's format, tagged with ``actor_id``, at the job's
    ``--log-level``: its INFO lines (engine ready, one per shard) are forwarded to the driver's terminal only
    when asked for, so that by default they do not break the progress bar.
    """
    logger = logging.getLogger("pipeline.actor")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter(FORMAT, DATEFMT))
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    tag_logger(logger.name, actor_id)
    return logger
