"""The Store: written once in shared.store.store (SqlStore) over a driver that carries each call of
an SQL function (infra/supabase/migrations) to the database: psycopg straight to Postgres
(shared.store.postgres) or supabase-py's rpc() through PostgREST (shared.store.supabase). Results
are decoded by shared.store.decode, so both behave the same.
"""
