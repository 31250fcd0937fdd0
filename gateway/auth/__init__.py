"""JWT identity: keys and JWKS, verification, claims and tiers, the verified-token cache.

The pipeline stage that uses them is :mod:`gateway.stages.auth`.
"""
