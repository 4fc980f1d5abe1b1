"""The console: users and sessions, the log of associations, and the keyed digests of each study's
Patient ID and Accession Number that the console's lookup searches.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    with op.batch_alter_table("studies") as studies:
        studies.add_column(sa.Column("patient_key", sa.String(32), nullable=True))
        studies.add_column(sa.Column("accession_key", sa.String(32), nullable=True))
        studies.create_index("ix_studies_patient_key", ["patient_key"])
        studies.create_index("ix_studies_accession_key", ["accession_key"])
    op.create_table(
        "console_users",
        sa.Column("name", sa.String(64), primary_key=True),
        sa.Column("role", sa.String(16), nullable=False),
        sa.Column("password_hash", sa.String(256), nullable=True),
        sa.Column("failed_logins", sa.Integer, nullable=False),
        sa.Column("locked_until", sa.Float, nullable=True),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_login_at", sa.Float, nullable=True),
    )
    op.create_table(
        "console_sessions",
        sa.Column("token_digest", sa.String(64), primary_key=True),
        sa.Column("user", sa.String(64), sa.ForeignKey("console_users.name", ondelete="CASCADE"), nullable=False),
        sa.Column("csrf_token", sa.String(64), nullable=False),
        sa.Column("created_at", sa.Float, nullable=False),
        sa.Column("last_seen_at", sa.Float, nullable=False),
        sa.Column("expires_at", sa.Float, nullable=False),
    )
    op.create_index("ix_console_sessions_user", "console_sessions", ["user"])
    op.create_index("ix_console_sessions_expires_at", "console_sessions", ["expires_at"])
    op.create_table(
        "associations",
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("calling_ae_title", sa.String(16), nullable=False),
        sa.Column("outcome", sa.String(16), nullable=False),
        sa.Column("started_at", sa.Float, nullable=False),
        sa.Column("ended_at", sa.Float, nullable=False),
        sa.Column("instances_stored", sa.Integer, nullable=False),
        sa.Column("instances_refused", sa.Integer, nullable=False),
        sa.Column("refused_statuses", sa.Text, nullable=False),
        sa.Column("bytes_received", sa.BigInteger, nullable=False),
    )
    op.create_index("ix_associations_calling_ae_title", "associations", ["calling_ae_title"])
    op.create_index("ix_associations_ended_at", "associations", ["ended_at"])


def downgrade() -> None:
    op.drop_table("associations")
    op.drop_table("console_sessions")
    op.drop_table("console_users")
    with op.batch_alter_table("studies") as studies:
        studies.drop_index("ix_studies_accession_key")
        studies.drop_index("ix_studies_patient_key")
        studies.drop_column("accession_key")
        studies.drop_column("patient_key")
