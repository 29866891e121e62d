"""risk scores: a new column on incidents and a risk register table."""

import sqlalchemy as sa
from alembic import op

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade():
    op.add_column("incidents", sa.Column("risk_score", sa.Integer, nullable=False, server_default="0"))
    op.execute("UPDATE incidents SET risk_score = CASE severity WHEN 'major' THEN 8 ELSE 3 END")
    register = op.create_table(
        "risk_register",
        sa.Column("id", sa.Integer, primary_key=True),
        sa.Column("risk", sa.Text, nullable=False),
        sa.Column("owner", sa.Text, nullable=False),
    )
    op.bulk_insert(register, [
        {"id": 1, "risk": "forklift traffic in shared aisles", "owner": "site safety"},
        {"id": 2, "risk": "fire equipment inspections lapse", "owner": "facilities"},
    ])


def downgrade():
    op.drop_table("risk_register")
    op.drop_column("incidents", "risk_score")
