"""Prefect flows over the midpo stages (installed as ``midpo_flows``; docs/layout.md)."""
