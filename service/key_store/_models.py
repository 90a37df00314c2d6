"""The key store's one table (SQLAlchemy 2 declarative); its schema is built only by Alembic
(migrations/key_store), in a database of its own, never the service's."""

from __future__ import annotations

from datetime import date, datetime

from sqlalchemy import Date, DateTime, Integer, LargeBinary, MetaData, func
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from ..models import NAMING

__all__ = ["ExpiryKey", "KeyStoreBase"]


class KeyStoreBase(DeclarativeBase):
    # A metadata of its own: the key store's tables must never be created in the service's
    # database (a backup of that one would then hold them), nor the service's here.
    metadata = MetaData(naming_convention=NAMING)


class ExpiryKey(KeyStoreBase):
    """The expiry key of one UTC day: a random 256-bit key, wrapped under a KEK version.

    Every data key of a conversation whose deadline falls on `day` is sealed under it. The
    retention runner deletes the row once the day has passed (after moving any data key that
    still needs it), and from then on no copy of those data keys, in any backup of the service's
    database, can be opened.
    """

    __tablename__ = "expiry_keys"

    day: Mapped[date] = mapped_column(Date, primary_key=True)
    kek_version: Mapped[int] = mapped_column(Integer, nullable=False)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary, nullable=False)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now(), nullable=False)
