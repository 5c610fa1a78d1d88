"""pqproxy: a hybrid post-quantum TLS 1.3 reverse proxy."""

__version__ = "0.1.0"
