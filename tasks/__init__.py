"""Thin Prefect tasks over the midpo stage functions (installed as ``midpo_tasks``; docs/layout.md)."""
