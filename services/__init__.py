"""Everything but the Locust layer: config, pools, event store, CDC, verification.

Nothing in this package imports locust, so the CDC consumer and the CLI run without
it.
"""
