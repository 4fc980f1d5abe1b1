"""The index as the releases before migrations created it: studies, instances, jobs.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "studies",
        sa.Column("study_key", sa.String(32), primary_key=True),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
        sa.Column("first_received_at", sa.Float, nullable=False),
        sa.Column("last_received_at", sa.Float, nullable=False),
        sa.Column("instance_count", sa.Integer, nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("map_object_id", sa.String(32), nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_studies_state", "studies", ["state"])
    op.create_index("ix_studies_last_received_at", "studies", ["last_received_at"])
    op.create_table(
        "instances",
        sa.Column("object_id", sa.String(32), primary_key=True),
        sa.Column("sop_key", sa.String(32), nullable=False, unique=True),
        sa.Column("study_key", sa.String(32), sa.ForeignKey("studies.study_key"), nullable=False),
        sa.Column("series_key", sa.String(32), nullable=False),
        sa.Column("sop_class_uid", sa.String(64), nullable=False),
        sa.Column("transfer_syntax_uid", sa.String(64), nullable=False),
        sa.Column("size", sa.Integer, nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
    )
    op.create_index("ix_instances_study_key", "instances", ["study_key"])
    op.create_index("ix_instances_series_key", "instances", ["series_key"])
    op.create_table(
        "jobs",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("study_key", sa.String(32), sa.ForeignKey("studies.study_key"), nullable=False),
        sa.Column("generation", sa.Integer, nullable=False),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("algorithm", sa.String(64), nullable=False),
        sa.Column("series_key", sa.String(32), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Float, nullable=True),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("result_object_ids", sa.Text, nullable=False),
        sa.Column("timings", sa.Text, nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("updated_at", sa.Float, nullable=False),
    )
    op.create_index("ix_jobs_study_key", "jobs", ["study_key"])
    op.create_index("ix_jobs_state", "jobs", ["state"])
    op.create_index("ix_jobs_next_attempt_at", "jobs", ["next_attempt_at"])


def downgrade() -> None:
    op.drop_table("jobs")
    op.drop_table("instances")
    op.drop_table("studies")
