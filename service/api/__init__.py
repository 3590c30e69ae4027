"""HTTP layer: routers, schemas, dependencies and the one place where domain errors become status codes."""
