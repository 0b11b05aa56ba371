"""The base every layer stands on: registries, shared types, errors, tensor helpers."""
