"""incidents: the platform's first table, with a few rows."""

import sqlalchemy as sa
from alembic import op

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade():
    incidents = op.create_table(
        "incidents",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("title", sa.Text, nullable=False),
        sa.Column("severity", sa.Text, nullable=False),
    )
    op.bulk_insert(incidents, [
        {"id": 1, "title": "slip in warehouse B", "severity": "minor"},
        {"id": 2, "title": "forklift near miss", "severity": "major"},
        {"id": 3, "title": "expired extinguisher", "severity": "minor"},
    ])


def downgrade():
    op.drop_table("incidents")
