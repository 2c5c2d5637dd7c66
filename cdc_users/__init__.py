"""The Locust layer: the account users and the event hooks that govern them.

The only package of the project that imports locust.
"""
