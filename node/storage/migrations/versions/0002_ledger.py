"""The job ledger: leases (worker, expiry), the route snapshot and configuration digest a job was
planned with, its stage and the stored outputs of its stages, and the record of every claim.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("jobs") as jobs:  # batch: SQLite cannot ALTER a column in place
        jobs.add_column(sa.Column("worker", sa.String(128), nullable=True))
        jobs.add_column(sa.Column("lease_expires_at", sa.Float, nullable=True))
        jobs.add_column(sa.Column("route_snapshot", sa.Text, nullable=True))
        jobs.add_column(sa.Column("config_digest", sa.String(64), nullable=True))
        jobs.add_column(sa.Column("stage", sa.String(16), nullable=False, server_default="deidentify"))
        jobs.add_column(sa.Column("stage_object_ids", sa.Text, nullable=False, server_default="{}"))
        jobs.create_index("ix_jobs_lease_expires_at", ["lease_expires_at"])
    # jobs a release without stages left half done start again at the first stage; those that
    # had built their results (result_object_ids) only deliver them; finished ones are done
    op.execute("UPDATE jobs SET stage = 'deliver' WHERE result_object_ids != '[]'")
    op.execute("UPDATE jobs SET stage = 'done' WHERE state IN ('delivered', 'refused', 'quarantined', 'superseded')")
    op.create_table(
        "job_claims",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer, sa.ForeignKey("jobs.id", ondelete="CASCADE"), nullable=False),
        sa.Column("worker", sa.String(128), nullable=False),
        sa.Column("stage", sa.String(16), nullable=False),
        sa.Column("claimed_at", sa.Float, nullable=False),
        sa.Column("lease_expires_at", sa.Float, nullable=False),
        sa.Column("released_at", sa.Float, nullable=True),
        sa.Column("outcome", sa.String(32), nullable=True),
    )
    op.create_index("ix_job_claims_job_id", "job_claims", ["job_id"])


def downgrade() -> None:
    op.drop_table("job_claims")
    with op.batch_alter_table("jobs") as jobs:
        jobs.drop_index("ix_jobs_lease_expires_at")
        for column in ("stage_object_ids", "stage", "config_digest", "route_snapshot", "lease_expires_at", "worker"):
            jobs.drop_column(column)
