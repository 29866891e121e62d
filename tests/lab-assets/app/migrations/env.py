"""Alembic environment of the lab's sample app: DATABASE_URL from the environment, else from
the .env file next to alembic.ini (the app's own settings file)."""

import os

from alembic import context
from sqlalchemy import create_engine, pool

config = context.config


def database_url():
    url = os.environ.get("DATABASE_URL")
    if not url:
        env_file = os.path.join(os.path.dirname(config.config_file_name), ".env")
        with open(env_file, encoding="utf-8") as f:
            for line in f.read().splitlines():
                key, sep, value = line.strip().partition("=")
                if sep and key.strip() == "DATABASE_URL":
                    url = value.strip()
    if not url:
        raise SystemExit("DATABASE_URL is not set in the environment nor in .env")
    return url.replace("postgresql://", "postgresql+psycopg2://", 1)


def run_offline():
    context.configure(url=database_url(), literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()


def run_online():
    engine = create_engine(database_url(), poolclass=pool.NullPool)
    with engine.connect() as conn:
        context.configure(connection=conn)
        with context.begin_transaction():
            context.run_migrations()


if context.is_offline_mode():
    run_offline()
else:
    run_online()
