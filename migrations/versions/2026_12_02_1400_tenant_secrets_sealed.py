"""tenants: signing secrets sealed at rest with the keys in SECRET_KEYS

Revision ID: 0003
Revises: 0002
Create Date: 2026-12-02 14:00:00.000000

The columns are renamed (`sealed_...`) and every plaintext secret is sealed here, in the
migration's transaction, with the first key of SECRET_KEYS read from the environment like any
setting. The alternative, a value format that tells plaintext from ciphertext and seals on
the next write, would leave plaintext in the table until every tenant happened to be written,
and would keep a plaintext branch in the code for ever. So after this revision the table holds
no plaintext, and the code reads only ciphertext.

A migration cannot invent the key: with tenants in the table and SECRET_KEYS empty it refuses,
and the transaction leaves the schema at 0002. An empty table (a new deployment) needs no key.
The downgrade opens the secrets again, with any key of the list.

The Fernet calls are written out here rather than imported from `workers.sealing`, so this
revision keeps meaning the format it wrote whatever that module becomes.
"""

from collections.abc import Callable, Sequence

import sqlalchemy as sa
from alembic import op
from cryptography.fernet import Fernet, InvalidToken, MultiFernet

from config import Settings

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

Change = Callable[[MultiFernet, bytes], bytes]

COLUMNS = (
    ("webhook_secret", "sealed_webhook_secret"),
    ("previous_webhook_secret", "sealed_previous_webhook_secret"),
)


def upgrade() -> None:
    for plain, sealed in COLUMNS:
        op.alter_column("tenants", plain, new_column_name=sealed)
    _rewrite([sealed for _, sealed in COLUMNS], MultiFernet.encrypt)


def downgrade() -> None:
    _rewrite([sealed for _, sealed in COLUMNS], _open)
    for plain, sealed in COLUMNS:
        op.alter_column("tenants", sealed, new_column_name=plain)


def _rewrite(columns: list[str], change: Change) -> None:
    """Apply `change` to every non-null value of `columns`, with the keys of SECRET_KEYS."""
    tenants = sa.table("tenants", sa.column("id"), *(sa.column(name) for name in columns))
    bind = op.get_bind()
    rows = bind.execute(sa.select(tenants)).mappings().all()
    if not rows:
        return
    keys = _keys()
    for row in rows:
        values = {
            name: change(keys, row[name].encode()).decode()
            for name in columns
            if row[name] is not None
        }
        bind.execute(tenants.update().where(tenants.c.id == row["id"]).values(**values))


def _keys() -> MultiFernet:
    keys = [key.get_secret_value() for key in Settings().secret_keys]
    if not keys:
        raise RuntimeError(
            "tenants hold signing secrets and SECRET_KEYS is empty: set SECRET_KEYS to a JSON "
            "list of Fernet keys (the first seals) and run the migration again"
        )
    return MultiFernet([Fernet(key) for key in keys])


def _open(keys: MultiFernet, sealed: bytes) -> bytes:
    try:
        return keys.decrypt(sealed)
    except InvalidToken:
        raise RuntimeError(
            "a tenant's signing secret opens with none of the keys in SECRET_KEYS"
        ) from None
