"""Job statuses, job types and asset kinds: the one place their names are spelled."""

from __future__ import annotations

from enum import StrEnum


class JobStatus(StrEnum):
    """queued -> running -> succeeded | failed | canceled (running -> queued on a retry)."""

    QUEUED = "queued"
    RUNNING = "running"
    SUCCEEDED = "succeeded"
    FAILED = "failed"
    CANCELED = "canceled"


ACTIVE = (JobStatus.QUEUED, JobStatus.RUNNING)
TERMINAL = (JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.CANCELED)
# what a webhook can ask for (`webhook_events`); the end events when it names none
WEBHOOK_EVENTS = ("started", "succeeded", "failed", "canceled")
DEFAULT_WEBHOOK_EVENTS = ("succeeded", "failed", "canceled")


class JobType(StrEnum):
    TRAIN_CONTENT = "train_content"
    TRAIN_STYLE = "train_style"
    FUSE = "fuse"
    GENERATE = "generate"


class AssetKind(StrEnum):
    CONTENT = "content"
    STYLE = "style"

    @property
    def other(self) -> AssetKind:
        """The kind whose assets serve as this kind's MCP auxiliary sets."""
        return AssetKind.STYLE if self is AssetKind.CONTENT else AssetKind.CONTENT

    @property
    def training_job(self) -> JobType:
        return JobType.TRAIN_CONTENT if self is AssetKind.CONTENT else JobType.TRAIN_STYLE


# Training and generation get separate queues, so a long training never delays a drawing.
JOB_QUEUES = {
    JobType.TRAIN_CONTENT: "training",
    JobType.TRAIN_STYLE: "training",
    JobType.FUSE: "training",
    JobType.GENERATE: "generation",
}
