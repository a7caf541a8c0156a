"""Configuration: module and route definitions (code defaults, database overrides), validation, and the live snapshot."""
