"""fine_tuning_jobs (OpenAI /v1/fine_tuning/jobs: a view of one prep -> train pipeline job)

Revision ID: 0005
Revises: 0004
Create Date: 2026-12-06 16:00:00
"""
from alembic import op
import sqlalchemy as sa


revision = '0005'
down_revision = '0004'
branch_labels = None
depends_on = None


def upgrade() -> None:
    op.create_table(
        'fine_tuning_jobs',
        sa.Column('id', sa.String(length=40), nullable=False),
        sa.Column('owner_id', sa.Integer(), nullable=True),
        sa.Column('job_id', sa.Integer(), nullable=True),
        sa.Column('model', sa.String(length=500), nullable=False),
        sa.Column('training_file', sa.String(length=40), nullable=False),
        sa.Column('validation_file', sa.String(length=40), nullable=True),
        sa.Column('suffix', sa.String(length=64), nullable=True),
        sa.Column('seed', sa.BigInteger(), nullable=False),
        sa.Column('hyperparameters', sa.JSON(), nullable=False),
        sa.Column('method', sa.JSON(), nullable=False),
        sa.Column('job_metadata', sa.JSON(), nullable=True),
        sa.Column('created_at', sa.DateTime(), nullable=False),
        sa.ForeignKeyConstraint(['owner_id'], ['users.id'], ondelete='SET NULL'),
        sa.ForeignKeyConstraint(['job_id'], ['jobs.id'], ondelete='SET NULL'),
        sa.PrimaryKeyConstraint('id'),
    )
    op.create_index(op.f('ix_fine_tuning_jobs_owner_id'), 'fine_tuning_jobs', ['owner_id'], unique=False)
    op.create_index(op.f('ix_fine_tuning_jobs_created_at'), 'fine_tuning_jobs', ['created_at'], unique=False)


def downgrade() -> None:
    op.drop_index(op.f('ix_fine_tuning_jobs_created_at'), table_name='fine_tuning_jobs')
    op.drop_index(op.f('ix_fine_tuning_jobs_owner_id'), table_name='fine_tuning_jobs')
    op.drop_table('fine_tuning_jobs')
