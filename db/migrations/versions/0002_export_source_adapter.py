"""model_artifacts.source_adapter_id: an export's adapter as an indexed column

Until now the adapter an export was made from lived only in the export row's `spec` JSON, so listing an
adapter's exports read every export row. The column is backfilled from that JSON (`spec.adapter_id`,
else `metrics.adapter_id`) where the adapter row still exists.

Revision ID: 0002
Revises: 0001
Create Date: 2026-12-08 10:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0002'
down_revision = '0001'
branch_labels = None
depends_on = None

_artifacts = sa.table('model_artifacts', sa.column('id', sa.Integer()), sa.column('kind', sa.String()),
                      sa.column('spec', sa.JSON()), sa.column('metrics', sa.JSON()),
                      sa.column('source_adapter_id', sa.Integer()))


def upgrade() -> None:
    with op.batch_alter_table('model_artifacts', schema=None) as batch_op:
        batch_op.add_column(sa.Column('source_adapter_id', sa.Integer(), nullable=True))
        batch_op.create_index(batch_op.f('ix_model_artifacts_source_adapter_id'), ['source_adapter_id'],
                              unique=False)
        batch_op.create_foreign_key('fk_model_artifacts_source_adapter_id', 'model_artifacts',
                                    ['source_adapter_id'], ['id'], ondelete='SET NULL')
    _backfill()


def _backfill() -> None:
    """Each export row's adapter id, read from its JSON in Python (the JSON operators differ by dialect)."""
    conn = op.get_bind()
    known = set(conn.scalars(sa.select(_artifacts.c.id)))
    exports = conn.execute(sa.select(_artifacts.c.id, _artifacts.c.spec, _artifacts.c.metrics)
                           .where(_artifacts.c.kind == 'export')).all()
    for export_id, spec, metrics in exports:
        adapter_id = (spec or {}).get('adapter_id') or (metrics or {}).get('adapter_id')
        if isinstance(adapter_id, int) and adapter_id in known:
            conn.execute(sa.update(_artifacts).where(_artifacts.c.id == export_id)
                         .values(source_adapter_id=adapter_id))


def downgrade() -> None:
    with op.batch_alter_table('model_artifacts', schema=None) as batch_op:
        batch_op.drop_constraint('fk_model_artifacts_source_adapter_id', type_='foreignkey')
        batch_op.drop_index(batch_op.f('ix_model_artifacts_source_adapter_id'))
        batch_op.drop_column('source_adapter_id')
