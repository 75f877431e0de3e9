"""Virtual keys: their shape and hash (`keys`), and turning a bearer token into a principal (`authenticator`)."""

from gateway.auth.authenticator import Authenticator, authorization_header, bearer_token, secret_matches

__all__ = ["Authenticator", "authorization_header", "bearer_token", "secret_matches"]
