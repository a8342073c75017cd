"""What the one store needs of a driver (shared/store/store.py): `call` one SQL function with named
arguments, and `close`; and the Json marker for a jsonb argument. The psycopg driver
(shared/store/postgres.py) and the PostgREST one (shared/store/supabase.py) implement it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True, slots=True)
class Json:
    """A jsonb argument. Explicit because the Python type cannot tell: a list may be a SQL array
    (bigint[] ids) or a JSON array (a sequence's parts), and each driver encodes JSON its own way."""

    value: Any


class Driver(Protocol):
    def call(self, function: str, /, **args: Any) -> Any:
        """`function(p_<name> => value, ...)`; its result as Python values. Raises StoreUnavailable
        when the database cannot be reached, StoreError when it refused the call."""
        ...

    def close(self) -> None: ...
