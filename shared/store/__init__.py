"""Store adapters: Postgres through psycopg, and Supabase through supabase-py's rpc().

Both call the same SQL functions (infra/supabase/migrations) and decode the same jsonb shapes with
shared.store.decode, so they behave the same.
"""
