"""Who may call what: API keys, roles, tenants and their limits, and TLS material."""
