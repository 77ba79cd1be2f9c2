"""The job system's transactions over the personalization database (``database``: tables, rows,
engines): one code path (SQLAlchemy Core) for SQLite (one replica, zero set-up) and PostgreSQL
(several replicas sharing the work).

SQLAlchemy Core rather than psycopg + sqlite3 by hand: the two dialects differ in exactly the
places that matter here (``FOR UPDATE SKIP LOCKED``, transaction start, RETURNING, upserts),
and Core spells each once. Concurrency rules:

* A job's events get dense indices 0, 1, 2, ... from a counter on the job row, incremented in
  the transaction that inserts the event (PostgreSQL serialises on the row lock, SQLite on its
  single writer), so a watcher that reads "index >= n" in order misses nothing.
* Workers claim a job (PENDING, or RUNNING with an expired lease) with ``SELECT ... FOR UPDATE
  SKIP LOCKED`` then a conditional UPDATE; on SQLite every write transaction is ``BEGIN
  IMMEDIATE`` (one writer), which makes the same two statements atomic.
* Every write a worker makes for a job is conditioned on it still holding the lease: a worker
  whose lease was taken over learns it from a zero row count and stops.

Times are Unix seconds from the replicas' clocks (keep them NTP-synchronised; the lease is
tens of seconds, so skew of a second does not matter).
"""
from __future__ import annotations

import json
import time
from typing import Iterable, Optional

import sqlalchemy as sa

from atelier.personalization.database import (STATES, TERMINAL, ConceptRow, EventRow, JobRow, checkpoint_parts,
                                              concepts, connect, events, jobs, new_id)

__all__ = ["JobStore", "QueueFull", "IdempotencyConflict"]


class QueueFull(Exception):
    pass


class IdempotencyConflict(Exception):
    pass


def _job(row) -> JobRow:
    values = dict(row._mapping)
    values["cancel_requested"] = bool(values["cancel_requested"])
    return JobRow(**values)


class JobStore:
    """The SQL side of the job system. ``url``: ``sqlite:///path.db`` or ``postgresql://...``."""

    def __init__(self, url: str):
        self.url, self.engine, self.reader = connect(url)
        self.is_sqlite = self.url.startswith("sqlite")

    def close(self) -> None:
        self.engine.dispose()
        if self.reader is not self.engine:
            self.reader.dispose()

    # ------------------------------------------------------------------ jobs: create / read

    def create_job(self, *, idempotency_key: Optional[str], body_hash: str, inputs_hash: str, method: str,
                   base_model: str, placeholder_token: str, class_word: str, total_steps: int,
                   max_pending: int) -> tuple[JobRow, bool]:
        """Insert a PENDING job and its first event; returns (job, created). With a key already
        used: the existing job when the body matches, else ``IdempotencyConflict``. More than
        ``max_pending`` PENDING jobs: ``QueueFull``."""
        if idempotency_key:
            existing = self.job_by_key(idempotency_key)
            if existing is not None:
                return self._same_body(existing, body_hash), False
        now = time.time()
        job_id = new_id("job")
        try:
            with self.engine.begin() as conn:
                pending = conn.execute(
                    sa.select(sa.func.count()).select_from(jobs).where(jobs.c.state == "PENDING")).scalar_one()
                if pending >= max_pending:
                    raise QueueFull(pending)
                conn.execute(jobs.insert().values(
                    id=job_id, idempotency_key=idempotency_key or None, body_hash=body_hash,
                    inputs_hash=inputs_hash, method=method, base_model=base_model,
                    placeholder_token=placeholder_token, class_word=class_word, state="PENDING", reason="",
                    step=0, total_steps=total_steps, create_time=now, attempts=0, cancel_requested=False,
                    checkpoint_step=0, next_event=0))
                self._append(conn, job_id, "PENDING", "state", 0, total_steps, message="queued")
        except sa.exc.IntegrityError:
            # Another call with the same key won the race.
            existing = self.job_by_key(idempotency_key) if idempotency_key else None
            if existing is None:
                raise
            return self._same_body(existing, body_hash), False
        return self.get_job(job_id), True

    @staticmethod
    def _same_body(existing: JobRow, body_hash: str) -> JobRow:
        if existing.body_hash != body_hash:
            raise IdempotencyConflict(existing.id)
        return existing

    def job_by_key(self, key: str) -> Optional[JobRow]:
        with self.reader.begin() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.idempotency_key == key)).first()
        return _job(row) if row else None

    def get_job(self, job_id: str) -> Optional[JobRow]:
        with self.reader.begin() as conn:
            row = conn.execute(sa.select(jobs).where(jobs.c.id == job_id)).first()
        return _job(row) if row else None

    def list_jobs(self, states: Iterable[str] = (), limit: int = 50,
                  after: Optional[tuple[float, str]] = None) -> list[JobRow]:
        """Newest first; ``after`` = (create_time, id) of the previous page's last job."""
        query = sa.select(jobs).order_by(jobs.c.create_time.desc(), jobs.c.id.desc()).limit(limit)
        states = list(states)
        if states:
            query = query.where(jobs.c.state.in_(states))
        if after is not None:
            time_, id_ = after
            query = query.where(sa.or_(jobs.c.create_time < time_,
                                       sa.and_(jobs.c.create_time == time_, jobs.c.id < id_)))
        with self.reader.begin() as conn:
            return [_job(row) for row in conn.execute(query)]

    def count_by_state(self) -> dict[str, int]:
        with self.reader.begin() as conn:
            rows = conn.execute(sa.select(jobs.c.state, sa.func.count()).group_by(jobs.c.state)).all()
        counts = {state: 0 for state in STATES}
        counts.update({state: int(n) for state, n in rows})
        return counts

    def events(self, job_id: str, from_index: int, limit: int = 500) -> list[EventRow]:
        query = (sa.select(events).where(events.c.job_id == job_id, events.c.idx >= from_index)
                 .order_by(events.c.idx).limit(limit))
        with self.reader.begin() as conn:
            return [EventRow(**dict(row._mapping)) for row in conn.execute(query)]

    # ------------------------------------------------------------------ jobs: workers

    def claim(self, owner: str, lease_seconds: float) -> Optional[tuple[JobRow, bool]]:
        """Atomically take the oldest PENDING job, or a RUNNING one whose lease expired.
        Returns (job, took_over) or None."""
        now = time.time()
        claimable = sa.or_(jobs.c.state == "PENDING",
                           sa.and_(jobs.c.state == "RUNNING", jobs.c.lease_expires < now))
        with self.engine.begin() as conn:
            row = conn.execute(
                sa.select(jobs.c.id, jobs.c.state, jobs.c.step, jobs.c.total_steps, jobs.c.lease_owner)
                .where(claimable).order_by(jobs.c.create_time).limit(1)
                .with_for_update(skip_locked=True)).first()
            if row is None:
                return None
            took_over = row.state == "RUNNING"
            result = conn.execute(
                jobs.update().where(jobs.c.id == row.id, claimable).values(
                    state="RUNNING", lease_owner=owner, lease_expires=now + lease_seconds,
                    attempts=jobs.c.attempts + 1, start_time=sa.func.coalesce(jobs.c.start_time, now)))
            if result.rowcount != 1:
                return None
            message = (f"resumed by {owner} after the lease of {row.lease_owner} expired" if took_over
                       else f"started by {owner}")
            self._append(conn, row.id, "RUNNING", "state", row.step, row.total_steps, message=message)
        return self.get_job(row.id), took_over

    def renew(self, job_id: str, owner: str, lease_seconds: float) -> Optional[bool]:
        """Extend the lease. Returns cancel_requested, or None when the lease is lost."""
        with self.engine.begin() as conn:
            result = conn.execute(jobs.update().where(*self._held(job_id, owner))
                                  .values(lease_expires=time.time() + lease_seconds))
            if result.rowcount != 1:
                return None
            return bool(conn.execute(sa.select(jobs.c.cancel_requested).where(jobs.c.id == job_id)).scalar_one())

    def record_step(self, job_id: str, owner: str, step: int, total_steps: int, phase: str,
                    losses: dict[str, float], preview: Optional[bytes] = None) -> Optional[bool]:
        """One step's event; returns cancel_requested, or None when the lease is lost. Two
        statements per step (UPDATE ... RETURNING, INSERT): this runs once per training step."""
        with self.engine.begin() as conn:
            row = conn.execute(jobs.update().where(*self._held(job_id, owner))
                               .values(step=step, total_steps=total_steps, next_event=jobs.c.next_event + 1)
                               .returning(jobs.c.next_event, jobs.c.cancel_requested)).first()
            if row is None:
                return None
            self._insert_event(conn, job_id, row.next_event - 1, "RUNNING", phase, step, total_steps,
                               losses=losses, preview=preview)
            return bool(row.cancel_requested)

    def set_total_steps(self, job_id: str, owner: str, total_steps: int) -> bool:
        with self.engine.begin() as conn:
            return conn.execute(jobs.update().where(*self._held(job_id, owner))
                                .values(total_steps=total_steps)).rowcount == 1

    def set_checkpoint(self, job_id: str, owner: str, digest: str, step: int,
                       parts: Iterable[str] = ()) -> Optional[list[str]]:
        """Point the job at a new checkpoint and the part artifacts it refers to; returns the
        artifacts this left unreferenced (the previous checkpoint, parts only it used: the caller
        deletes the files), or None when the lease is lost (the new files are then unreferenced)."""
        parts = set(parts)
        with self.engine.begin() as conn:
            previous = conn.execute(sa.select(jobs.c.checkpoint_hash).where(*self._held(job_id, owner))).first()
            if previous is None:
                return None
            dropped = self._drop_parts(conn, [job_id])
            conn.execute(jobs.update().where(jobs.c.id == job_id)
                         .values(checkpoint_hash=digest, checkpoint_step=step))
            if parts:
                conn.execute(checkpoint_parts.insert(), [{"job_id": job_id, "digest": part} for part in sorted(parts)])
            return self._unreferenced_of(conn, (dropped | {previous.checkpoint_hash}) - parts - {digest})

    def succeed(self, job_id: str, owner: str, concept: ConceptRow) -> bool:
        """Insert the concept and end the job in one transaction: the concept becomes visible
        exactly when the job says SUCCEEDED, and only once."""
        with self.engine.begin() as conn:
            job = conn.execute(sa.select(jobs.c.step, jobs.c.total_steps).where(*self._held(job_id, owner))).first()
            if job is None:
                return False
            conn.execute(concepts.insert().values(**concept.__dict__))
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                state="SUCCEEDED", concept_id=concept.id, end_time=time.time(), lease_owner=None,
                lease_expires=None))
            self._append(conn, job_id, "SUCCEEDED", "state", job.step, job.total_steps, message="finished",
                         concept_id=concept.id)
        return True

    def end(self, job_id: str, owner: Optional[str], state: str, reason: str) -> bool:
        """FAILED or CANCELLED, by the lease holder (``owner``) or, for a PENDING job, by anyone."""
        assert state in ("FAILED", "CANCELLED")
        with self.engine.begin() as conn:
            condition = self._held(job_id, owner) if owner else (jobs.c.id == job_id, jobs.c.state == "PENDING")
            job = conn.execute(sa.select(jobs.c.step, jobs.c.total_steps).where(*condition)).first()
            if job is None:
                return False
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(
                state=state, reason=reason, end_time=time.time(), lease_owner=None, lease_expires=None))
            self._append(conn, job_id, state, "state", job.step, job.total_steps, message=reason)
        return True

    def request_cancel(self, job_id: str, reason: str) -> Optional[JobRow]:
        """PENDING -> CANCELLED now; RUNNING -> cancel_requested (the worker stops at its next
        step); finished: unchanged. None for an unknown id."""
        job = self.get_job(job_id)
        if job is None:
            return None
        if job.state == "PENDING" and self.end(job_id, None, "CANCELLED", reason):
            return self.get_job(job_id)
        with self.engine.begin() as conn:
            conn.execute(jobs.update().where(jobs.c.id == job_id, jobs.c.state == "RUNNING",
                                             jobs.c.cancel_requested == sa.false())
                         .values(cancel_requested=True, reason=reason))
        return self.get_job(job_id)

    @staticmethod
    def _held(job_id: str, owner: str):
        return (jobs.c.id == job_id, jobs.c.lease_owner == owner, jobs.c.state == "RUNNING")

    @classmethod
    def _append(cls, conn, job_id: str, state: str, phase: str, step: int, total_steps: int, **fields) -> int:
        # The counter update takes the job row's lock (PostgreSQL) or runs under the single
        # writer (SQLite): concurrent appenders get consecutive indices.
        index = conn.execute(jobs.update().where(jobs.c.id == job_id).values(next_event=jobs.c.next_event + 1)
                             .returning(jobs.c.next_event)).scalar_one() - 1
        cls._insert_event(conn, job_id, index, state, phase, step, total_steps, **fields)
        return index

    @staticmethod
    def _insert_event(conn, job_id: str, index: int, state: str, phase: str, step: int, total_steps: int, *,
                      losses: Optional[dict] = None, message: str = "", preview: Optional[bytes] = None,
                      concept_id: str = "") -> None:
        conn.execute(events.insert().values(
            job_id=job_id, idx=index, state=state, phase=phase, step=int(step), total_steps=int(total_steps),
            losses=json.dumps(losses or {}), message=message, preview=preview, time=time.time(),
            concept_id=concept_id))

    # ------------------------------------------------------------------ retention

    def purge_finished(self, older_than: float) -> list[str]:
        """Delete jobs that ended before ``older_than`` with their events; returns the artifact
        hashes they referenced that nothing else references (the caller deletes the files).
        Concepts stay: they are the user's, removed only by DeleteConcept."""
        with self.engine.begin() as conn:
            rows = conn.execute(sa.select(jobs.c.id, jobs.c.inputs_hash, jobs.c.checkpoint_hash).where(
                jobs.c.state.in_(TERMINAL), jobs.c.end_time < older_than)).all()
            if not rows:
                return []
            ids = [row.id for row in rows]
            hashes = self._drop_parts(conn, ids) | {h for row in rows for h in (row.inputs_hash, row.checkpoint_hash)}
            conn.execute(events.delete().where(events.c.job_id.in_(ids)))
            conn.execute(jobs.delete().where(jobs.c.id.in_(ids)))
            return self._unreferenced_of(conn, hashes)

    def clear_checkpoint(self, job_id: str) -> list[str]:
        """Forget a finished job's checkpoint and its parts (no longer needed); returns those
        now unreferenced."""
        with self.engine.begin() as conn:
            row = conn.execute(sa.select(jobs.c.checkpoint_hash).where(
                jobs.c.id == job_id, jobs.c.state.in_(TERMINAL))).first()
            if row is None:
                return []
            dropped = self._drop_parts(conn, [job_id]) | {row.checkpoint_hash}
            conn.execute(jobs.update().where(jobs.c.id == job_id).values(checkpoint_hash=None))
            return self._unreferenced_of(conn, dropped)

    def unreferenced(self, digest: str) -> bool:
        with self.reader.begin() as conn:
            return not self._referenced(conn, digest)

    @staticmethod
    def _drop_parts(conn, job_ids: list[str]) -> set[str]:
        """Delete the jobs' checkpoint-part rows; returns their hashes."""
        digests = conn.execute(sa.select(checkpoint_parts.c.digest)
                               .where(checkpoint_parts.c.job_id.in_(job_ids))).scalars().all()
        if digests:
            conn.execute(checkpoint_parts.delete().where(checkpoint_parts.c.job_id.in_(job_ids)))
        return set(digests)

    @classmethod
    def _unreferenced_of(cls, conn, digests: Iterable[Optional[str]]) -> list[str]:
        return sorted(d for d in set(digests) if d and not cls._referenced(conn, d))

    @staticmethod
    def _referenced(conn, digest: str) -> bool:
        for column in (jobs.c.inputs_hash, jobs.c.checkpoint_hash, checkpoint_parts.c.digest,
                       concepts.c.content_hash):
            if conn.execute(sa.select(sa.literal(1)).where(column == digest).limit(1)).first():
                return True
        return False

    # ------------------------------------------------------------------ concepts

    def add_concept(self, concept: ConceptRow) -> None:
        with self.engine.begin() as conn:
            conn.execute(concepts.insert().values(**concept.__dict__))

    def get_concept(self, concept_id: str) -> Optional[ConceptRow]:
        with self.reader.begin() as conn:
            row = conn.execute(sa.select(concepts).where(concepts.c.id == concept_id)).first()
        return ConceptRow(**dict(row._mapping)) if row else None

    def list_concepts(self, limit: int = 50, after: Optional[tuple[float, str]] = None) -> list[ConceptRow]:
        query = sa.select(concepts).order_by(concepts.c.create_time.desc(), concepts.c.id.desc()).limit(limit)
        if after is not None:
            time_, id_ = after
            query = query.where(sa.or_(concepts.c.create_time < time_,
                                       sa.and_(concepts.c.create_time == time_, concepts.c.id < id_)))
        with self.reader.begin() as conn:
            return [ConceptRow(**dict(row._mapping)) for row in conn.execute(query)]

    def delete_concept(self, concept_id: str) -> Optional[tuple[str, bool]]:
        """Remove the row; returns (content_hash, whether the file is now unreferenced), or None."""
        with self.engine.begin() as conn:
            digest = conn.execute(sa.select(concepts.c.content_hash)
                                  .where(concepts.c.id == concept_id)).scalar_one_or_none()
            if digest is None:
                return None
            conn.execute(concepts.delete().where(concepts.c.id == concept_id))
            return digest, not self._referenced(conn, digest)
