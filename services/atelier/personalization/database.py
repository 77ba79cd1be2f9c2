"""The personalization database: its tables, their row types, and one engine pair per dialect
(SQLite for one replica with zero set-up, PostgreSQL for several replicas sharing the work).
The transactions over it live in ``store.JobStore``.

New tables may be added here (``create_all`` creates missing tables on an existing database);
a new column on an existing table would need a migration, which this project does not have.
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from typing import Optional

import sqlalchemy as sa
from sqlalchemy import event as sa_event

__all__ = ["STATES", "TERMINAL", "JobRow", "EventRow", "ConceptRow", "new_id", "connect",
           "metadata", "jobs", "events", "concepts", "checkpoint_parts"]

STATES = ("PENDING", "RUNNING", "SUCCEEDED", "FAILED", "CANCELLED")
TERMINAL = ("SUCCEEDED", "FAILED", "CANCELLED")

metadata = sa.MetaData()

jobs = sa.Table(
    "atelier_jobs", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("idempotency_key", sa.String(256), unique=True, nullable=True),
    sa.Column("body_hash", sa.String(64), nullable=False),     # the request as the client sent it
    sa.Column("inputs_hash", sa.String(64), nullable=False),   # artifact: the request with masks filled in
    sa.Column("method", sa.String(64), nullable=False),
    sa.Column("base_model", sa.String(256), nullable=False),
    sa.Column("placeholder_token", sa.String(256), nullable=False),
    sa.Column("class_word", sa.String(256), nullable=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("reason", sa.Text, nullable=False, default=""),
    sa.Column("step", sa.Integer, nullable=False, default=0),
    sa.Column("total_steps", sa.Integer, nullable=False, default=0),
    sa.Column("create_time", sa.Float, nullable=False),
    sa.Column("start_time", sa.Float, nullable=True),
    sa.Column("end_time", sa.Float, nullable=True),
    sa.Column("lease_owner", sa.String(128), nullable=True),
    sa.Column("lease_expires", sa.Float, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False, default=0),
    sa.Column("cancel_requested", sa.Boolean, nullable=False, default=False),
    sa.Column("checkpoint_hash", sa.String(64), nullable=True),
    sa.Column("checkpoint_step", sa.Integer, nullable=False, default=0),
    sa.Column("concept_id", sa.String(64), nullable=True),
    sa.Column("next_event", sa.Integer, nullable=False, default=0),
    sa.Index("atelier_jobs_claim", "state", "create_time"),
)

events = sa.Table(
    "atelier_job_events", metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("idx", sa.Integer, primary_key=True, autoincrement=False),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("phase", sa.String(64), nullable=False),
    sa.Column("step", sa.Integer, nullable=False),
    sa.Column("total_steps", sa.Integer, nullable=False),
    sa.Column("losses", sa.Text, nullable=False),  # JSON object
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("preview", sa.LargeBinary, nullable=True),  # PNG
    sa.Column("time", sa.Float, nullable=False),
    sa.Column("concept_id", sa.String(64), nullable=False),
)

concepts = sa.Table(
    "atelier_concepts", metadata,
    sa.Column("id", sa.String(64), primary_key=True),
    sa.Column("job_id", sa.String(64), nullable=False),
    sa.Column("placeholder_token", sa.String(256), nullable=False),
    sa.Column("class_word", sa.String(256), nullable=False),
    sa.Column("base_model", sa.String(256), nullable=False),
    sa.Column("method", sa.String(64), nullable=False),
    sa.Column("content_hash", sa.String(64), nullable=False),
    sa.Column("size_bytes", sa.BigInteger, nullable=False),
    sa.Column("create_time", sa.Float, nullable=False),
    sa.Column("metadata", sa.Text, nullable=False),  # JSON object of strings
)



checkpoint_parts = sa.Table(
    # Artifacts a job's current checkpoint refers to besides its own file (large state written
    # once, e.g. EqDiff's class images): each row keeps its file alive until the checkpoint goes.
    "atelier_checkpoint_parts", metadata,
    sa.Column("job_id", sa.String(64), primary_key=True),
    sa.Column("digest", sa.String(64), primary_key=True),
)

@dataclass(frozen=True)
class JobRow:
    id: str
    idempotency_key: Optional[str]
    body_hash: str
    inputs_hash: str
    method: str
    base_model: str
    placeholder_token: str
    class_word: str
    state: str
    reason: str
    step: int
    total_steps: int
    create_time: float
    start_time: Optional[float]
    end_time: Optional[float]
    lease_owner: Optional[str]
    lease_expires: Optional[float]
    attempts: int
    cancel_requested: bool
    checkpoint_hash: Optional[str]
    checkpoint_step: int
    concept_id: Optional[str]
    next_event: int


@dataclass(frozen=True)
class EventRow:
    job_id: str
    idx: int
    state: str
    phase: str
    step: int
    total_steps: int
    losses: str
    message: str
    preview: Optional[bytes]
    time: float
    concept_id: str


@dataclass(frozen=True)
class ConceptRow:
    id: str
    job_id: str
    placeholder_token: str
    class_word: str
    base_model: str
    method: str
    content_hash: str
    size_bytes: int
    create_time: float
    metadata: str


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"

def connect(url: str) -> tuple[str, sa.Engine, sa.Engine]:
    """(normalised url, writer engine, reader engine) for ``sqlite:///path.db`` or
    ``postgresql://...``, with every table created."""
    if url.startswith("postgresql://") or url.startswith("postgres://"):
        url = "postgresql+psycopg://" + url.split("://", 1)[1]
    if url.startswith("sqlite"):
        # Writers take the lock up front (BEGIN IMMEDIATE): a read-then-write transaction
        # cannot deadlock upgrading its lock, and claims are atomic. Readers (watchers,
        # Get/List) use a second engine with plain deferred BEGIN, which WAL lets run
        # alongside the writer.
        writer = _sqlite_engine(url, "BEGIN IMMEDIATE")
        reader = _sqlite_engine(url, "BEGIN")
    else:
        writer = sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=10)
        reader = writer
    metadata.create_all(writer)
    return url, writer, reader


def _sqlite_engine(url: str, begin: str) -> sa.Engine:
    engine = sa.create_engine(url, connect_args={"timeout": 60, "check_same_thread": False})

    @sa_event.listens_for(engine, "connect")
    def _connect(dbapi_connection, _record):
        dbapi_connection.isolation_level = None  # SQLAlchemy emits BEGIN itself, below
        cursor = dbapi_connection.cursor()
        cursor.execute("PRAGMA journal_mode=WAL")
        cursor.execute("PRAGMA synchronous=FULL")
        cursor.execute("PRAGMA busy_timeout=60000")
        cursor.close()

    @sa_event.listens_for(engine, "begin")
    def _begin(connection):
        connection.exec_driver_sql(begin)

    return engine
