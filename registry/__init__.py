"""
The nanorun run registry: a DuckDB file at $NANORUN_HOME/registry.duckdb, rebuilt at will from the run
directories (the source of truth). duckdb + pyarrow only; never torch.

    from registry import ingest_run, sync, rebuild, list_runs, get_run, leaderboard, query
"""

from registry.db import (CORE_NUM_TASKS, CORE_THRESHOLD, SCHEMA_VERSION, RegistryLocked, connect,
                         registry_path)
from registry.ingest import ingest_all, ingest_run, rebuild, sync
from registry.queries import QueryError, get_run, leaderboard, list_runs, query

__all__ = ["CORE_NUM_TASKS", "CORE_THRESHOLD", "SCHEMA_VERSION", "QueryError", "RegistryLocked", "connect",
           "get_run", "ingest_all", "ingest_run", "leaderboard", "list_runs", "query", "rebuild",
           "registry_path", "sync"]
