"""batches (OpenAI /v1/batches: a view of one classify job)

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-06 15:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0004'
down_revision = '0003'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'batches',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('owner_id', sa.Integer(), nullable=True),
        sa.Column('job_id', sa.Integer(), nullable=True),
        sa.Column('endpoint', sa.String(length=64), nullable=False),
        sa.Column('completion_window', sa.String(length=16), nullable=False),
        sa.Column('model', sa.String(length=500), nullable=True),
        sa.Column('input_file_id', sa.String(length=40), nullable=False),
        sa.Column('items_file_id', sa.String(length=60), nullable=True),
        sa.Column('output_file_id', sa.String(length=40), nullable=True),
        sa.Column('error_file_id', sa.String(length=40), nullable=True),
        sa.Column('status', sa.String(length=16), nullable=False),
        sa.Column('batch_metadata', sa.JSON(), nullable=True),
        sa.Column('errors', sa.JSON(), nullable=True),
        sa.Column('line_errors', sa.JSON(), nullable=True),
        sa.Column('total', sa.Integer(), nullable=False),
        sa.Column('completed', sa.Integer(), nullable=False),
        sa.Column('failed', sa.Integer(), nullable=False),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.Column('in_progress_at', sa.DateTime(), nullable=True),
        sa.Column('finalizing_at', sa.DateTime(), nullable=True),
        sa.Column('completed_at', sa.DateTime(), nullable=True),
        sa.Column('failed_at', sa.DateTime(), nullable=True),
        sa.Column('cancelling_at', sa.DateTime(), nullable=True),
        sa.Column('cancelled_at', sa.DateTime(), nullable=True),
        sa.ForeignKeyConstraint(['owner_id'], ['users.id'], ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index(op.f('ix_batches_owner_id'), 'batches', ['owner_id'], unique=False)
    op.create_index(op.f('ix_batches_created_at'), 'batches', ['created_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_batches_created_at'), table_name='batches')
    op.drop_index(op.f('ix_batches_owner_id'), table_name='batches')
    op.drop_table('batches')
