"""The data layer: sources into the PKU-SafeRLHF schema, subset rules, splits, validation, versions."""
