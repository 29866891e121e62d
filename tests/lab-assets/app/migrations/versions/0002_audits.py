"""audits: findings linked to incidents, with a few rows."""

import sqlalchemy as sa
from alembic import op

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade():
    audits = op.create_table(
        "audits",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("incident_id", sa.Integer, sa.ForeignKey("incidents.id"), nullable=False),
        sa.Column("finding", sa.Text, nullable=False),
    )
    op.bulk_insert(audits, [
        {"id": 1, "incident_id": 1, "finding": "floor signage missing"},
        {"id": 2, "incident_id": 2, "finding": "aisle width below standard"},
    ])


def downgrade():
    op.drop_table("audits")
