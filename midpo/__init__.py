"""midpo: an orchestrated MidPO training pipeline (library part: no Prefect imports)."""

__version__ = "0.1.0"
