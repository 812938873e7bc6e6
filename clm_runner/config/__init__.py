"""Recipes: the schema of a job, reading TOML and --set, type and value checks, rendering, secrets."""
