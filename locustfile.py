"""Entry point: `locust -f locustfile.py` (web UI) or headless, see the README.

Locust patches the standard library for gevent when it is imported, before this
file and before psycopg: the pools below are cooperative because of that order.
"""

from cdc_users import hooks
from cdc_users.users import AccountUser

hooks.register()

__all__ = ["AccountUser"]
