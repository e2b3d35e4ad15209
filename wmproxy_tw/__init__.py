"""wmproxy-tw: an all-in-one network proxy as a Twisted service plugin."""

__version__ = "0.1.0"
