"""Models in clinical use: what each job's model saw and said, the result objects' keys (to match
readers' rejection notes), the rejections, and the drift baselines; the storage commitments that
deliveries ask destinations for.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        "model_records",
        sa.Column("job_id", sa.Integer, primary_key=True),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("algorithm", sa.String(64), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("against", sa.String(64), nullable=True),
        sa.Column("recorded_at", sa.Float, nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("reason", sa.Text, nullable=True),
        sa.Column("inference_s", sa.Float, nullable=True),
        sa.Column("inputs", sa.Text, nullable=False),
        sa.Column("outputs", sa.Text, nullable=False),
        sa.Column("comparison", sa.Text, nullable=True),
    )
    op.create_index("ix_model_records_model", "model_records", ["model"])
    op.create_index("ix_model_records_recorded_at", "model_records", ["recorded_at"])
    op.create_table(
        "result_keys",
        sa.Column("sop_key", sa.String(32), primary_key=True),
        sa.Column("job_id", sa.Integer, nullable=False),
    )
    op.create_index("ix_result_keys_job_id", "result_keys", ["job_id"])
    op.create_table(
        "model_rejections",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("job_id", sa.Integer, nullable=False),
        sa.Column("note_key", sa.String(32), nullable=False),
        sa.Column("model", sa.String(64), nullable=False),
        sa.Column("version", sa.String(64), nullable=False),
        sa.Column("route", sa.String(64), nullable=False),
        sa.Column("reason_code", sa.String(16), nullable=False),
        sa.Column("reason", sa.String(64), nullable=False),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
        sa.Column("received_at", sa.Float, nullable=False),
        sa.UniqueConstraint("job_id", "note_key", name="uq_model_rejections_job_note"),
    )
    op.create_index("ix_model_rejections_job_id", "model_rejections", ["job_id"])
    op.create_index("ix_model_rejections_model", "model_rejections", ["model"])
    op.create_table(
        "model_baselines",
        sa.Column("model", sa.String(64), primary_key=True),
        sa.Column("version", sa.String(64), primary_key=True),
        sa.Column("start", sa.Float, nullable=False),
        sa.Column("end", sa.Float, nullable=False),
        sa.Column("set_at", sa.Float, nullable=False),
    )

    op.create_table(
        "commitments",
        sa.Column("transaction_uid", sa.String(64), primary_key=True),
        sa.Column("peer", sa.String(16), nullable=False),
        sa.Column("requested", sa.Integer, nullable=False),
        sa.Column("requested_at", sa.Float, nullable=False),
        sa.Column("reported_at", sa.Float, nullable=True),
        sa.Column("committed", sa.Integer, nullable=True),
        sa.Column("failures", sa.Text, nullable=True),
    )


def downgrade() -> None:
    op.drop_table("commitments")
    op.drop_table("model_baselines")
    op.drop_table("model_rejections")
    op.drop_table("result_keys")
    op.drop_table("model_records")
