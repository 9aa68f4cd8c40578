"""Monitoring of a served model: cheap per-image statistics, the reference profile saved in the bundle,
the bounded prediction log, drift tests against the profile and the drift report (no Prefect here)."""
