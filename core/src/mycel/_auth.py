"""Who a subscriber is, proven by a signed token rather than claimed.

Query parameters are claims a client makes about itself: anyone can type
``?user_id=123``. The WebSocket, SSE and GraphQL server connectors take an
``auth`` block (:class:`AuthSettings`) that verifies a JWT when a client
connects; its claims become ``context.user`` and no client parameter can
change them. This module is the protocol-independent part every one of those
connectors calls, so that each integrates it in a few lines::

    auth = Authenticator(settings.auth, services.base_dir)    # keys load once
    try:
        identity = auth.authenticate(headers, query, cookies)
    except AuthError as exc:
        ...  # HTTP 401, exc.reason as the body, exc.www_authenticate header
    context = auth.build_context(query, identity, {"id": connection_id})
    timer = ExpiryTimer(lambda: close(CLOSE_TOKEN_EXPIRED, "token expired"))
    timer.schedule(identity)

Verification is PyJWT's; nothing here parses or checks a signature by hand.
The settings refuse the ``none`` algorithm and the algorithm-confusion
attack (an HMAC algorithm with a public key, whose PEM text is no secret).

Shortcomings, stated plainly: a JWKS file is read once, at start, and never
fetched from a URL; keys rotate by restarting. A token refresh extends a
connection's life but does not replace ``context.user`` (see
:meth:`Authenticator.refresh`); a changed claim needs a reconnect.

"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import jwt
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key
from cryptography.x509 import load_pem_x509_certificate
from pydantic import Field, SecretStr, ValidationInfo, field_validator

from ._expr import Expression
from ._settings import Duration, Settings
from .errors import ConnectorError, ExpressionError, MycelError

__all__ = [
    "ANONYMOUS",
    "CLOSE_TOKEN_EXPIRED",
    "GRAPHQL_WS_UNAUTHORIZED",
    "SSE_EXPIRED_EVENT",
    "AuthError",
    "AuthSettings",
    "Authenticator",
    "ExpiryTimer",
    "Identity",
    "JoinPolicy",
    "JwtSettings",
    "build_context",
    "check_origin",
]

logger = logging.getLogger("mycel.auth")

CLOSE_TOKEN_EXPIRED = 4001
"""WebSocket and graphql-ws close code when a connection's token expires."""

GRAPHQL_WS_UNAUTHORIZED = 4401
"""graphql-ws close code when ``connection_init`` brings no acceptable token."""

SSE_EXPIRED_EVENT = "token_expired"
"""SSE event type sent just before a stream ends because its token expired."""

_HMAC = {"HS256": 32, "HS384": 48, "HS512": 64}  # algorithm -> least key bytes
_RSA = ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")
_CURVES = {"secp256r1": "ES256", "secp384r1": "ES384", "secp521r1": "ES512"}
_CURVES["secp256k1"] = "ES256K"
_ASYMMETRIC = (*_RSA, *_CURVES.values(), "EdDSA")
_KNOWN = (*_HMAC, *_ASYMMETRIC)

# Claims that differ between two tokens of one identity.
_TIME_CLAIMS = frozenset({"exp", "iat", "nbf", "jti", "auth_time"})


class AuthError(MycelError):
    """A client's token was refused, or it brought none where one is needed.

    ``reason`` is short and safe to show the client ("token expired", "bad
    signature", ...); it never contains the token. ``status`` is the HTTP
    status to answer with before a WebSocket upgrade or an SSE stream.

    """

    status = 401

    def __init__(self, reason: str, *, missing: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.missing = missing

    @property
    def www_authenticate(self) -> str:
        """The ``WWW-Authenticate`` header of a 401 answer (RFC 6750)."""
        if self.missing:
            return 'Bearer realm="mycel"'
        return (
            'Bearer realm="mycel", error="invalid_token", '
            f'error_description="{self.reason}"'
        )


# Settings


class JwtSettings(Settings):
    """How tokens are verified (the ``jwt { ... }`` block inside ``auth``).

    Exactly one of ``secret``, ``public_key`` and ``jwks_file`` is set.

    """

    secret: SecretStr | None = None
    """HMAC key shared with the token issuer (HS256, HS384, HS512); at least
    as many bytes as the hash (32 for HS256), as RFC 7518 requires."""

    public_key: str | None = None
    """RSA, EC or Ed25519 public key: PEM text, or the path of a PEM file
    (public key or certificate), relative to the configuration directory."""

    jwks_file: str | None = Field(default=None, validate_default=True)
    """Path of a JSON Web Key Set file (``{"keys": [...]}``) of public keys,
    relative to the configuration directory; a token picks its key by
    ``kid``."""

    audience: str | list[str] | None = None
    """Accepted ``aud`` values; when set, a token must name one of them.
    When unset, a token that carries an ``aud`` is refused."""

    issuer: str | None = None
    """Required ``iss`` value; when set, a token must carry exactly it."""

    algorithms: list[str] | None = Field(default=None, validate_default=True)
    """Accepted signing algorithms. Unset: ``HS256`` with a secret, and the
    algorithm a public key's type implies (``RS256`` for RSA, ``ES256`` for
    P-256, ``EdDSA`` for Ed25519, a JWK's own ``alg``). ``none`` is never
    accepted, nor an HMAC algorithm with a public key."""

    leeway: Duration = Field(default=30.0, ge=0)
    """Clock skew tolerated on ``exp``, ``nbf`` and ``iat``; a connection is
    closed this long after its token's ``exp``."""

    required_claims: list[str] = Field(default_factory=lambda: ["exp", "sub"])
    """Claims a token must carry. ``exp`` makes every connection end;
    ``sub`` is who the user is (``context.user.sub``)."""

    # The checks across fields are field validators, not a model validator:
    # a model validator's error would show the whole block, secret included.

    @field_validator("jwks_file")
    @classmethod
    def _check_one_key(cls, jwks_file: str | None, info: ValidationInfo) -> str | None:
        given = [
            name
            for name, value in (*info.data.items(), ("jwks_file", jwks_file))
            if name in ("secret", "public_key", "jwks_file") and value is not None
        ]
        if not given:
            raise ValueError("jwt needs one of secret, public_key or jwks_file")
        if len(given) > 1:
            raise ValueError(
                "jwt takes only one of secret, public_key or jwks_file, "
                f"not {' and '.join(given)}"
            )
        return jwks_file

    @field_validator("algorithms")
    @classmethod
    def _check_algorithms(
        cls, algorithms: list[str] | None, info: ValidationInfo
    ) -> list[str] | None:
        if algorithms is not None and not algorithms:
            raise ValueError(
                "algorithms cannot be empty; leave it unset for the default"
            )
        for name in algorithms or ():
            if name.lower() == "none":
                raise ValueError(
                    "algorithm 'none' is never allowed: it accepts unsigned tokens"
                )
            if name not in _KNOWN:
                raise ValueError(
                    f"unknown algorithm {name!r}; use one of {', '.join(_KNOWN)}"
                )
        secret = info.data.get("secret")
        if isinstance(secret, SecretStr):
            _check_secret(secret, algorithms or ["HS256"])
        elif info.data.get("public_key") or info.data.get("jwks_file"):
            for name in algorithms or ():
                if name in _HMAC:
                    raise ValueError(
                        f"algorithm {name!r} needs a secret, not a public key: "
                        "a public key used as an HMAC secret lets anyone forge "
                        "tokens"
                    )
        return algorithms


def _check_secret(secret: SecretStr, algorithms: list[str]) -> None:
    length = len(secret.get_secret_value().encode())
    for name in algorithms:
        if name not in _HMAC:
            raise ValueError(
                f"algorithm {name!r} needs public_key or jwks_file, not a secret"
            )
        if length < _HMAC[name]:
            raise ValueError(
                f"secret is {length} bytes; {name} needs at least "
                f"{_HMAC[name]} (RFC 7518 section 3.2)"
            )


class AuthSettings(Settings):
    """The ``auth { ... }`` block of a WebSocket, SSE or GraphQL server.

    Tokens are looked for in this order: the ``header``, the ``cookie``,
    the ``query_param``, and (graphql-ws only) the ``connection_init``
    payload; the first one present is the one verified.

    """

    required: bool = False
    """Refuse clients without a valid token (HTTP 401 before the upgrade or
    stream, graphql-ws 4401). When false they connect anonymously, without
    ``context.user``, and only filters that need no user match them."""

    jwt: JwtSettings
    """How tokens are verified."""

    header: str | None = "Authorization"
    """Request header carrying ``Bearer TOKEN``; null: headers are not read."""

    cookie: str | None = None
    """Cookie carrying the token; null (the default): cookies are not read.
    Browsers send cookies on cross-site requests too: set the connector's
    ``allowed_origins`` when you enable this."""

    query_param: str | None = "token"
    """Query parameter carrying the token, for browsers' ``EventSource`` and
    ``WebSocket``, which cannot set headers; null: not read. The parameter
    never reaches ``context.params``."""

    connection_param: str | None = "token"
    """Key of the graphql-ws ``connection_init`` payload carrying the token
    (a key named like ``header``, holding ``Bearer TOKEN``, is read too)."""

    join_if: str | None = None
    """CEL condition a room join must meet, with ``context`` (the
    connection's, ``context.user`` included) and ``room`` (its name) in
    scope, e.g. ``room.startsWith(context.user.tenant + ':')``."""

    @field_validator("join_if")
    @classmethod
    def _compile_join_if(cls, source: str | None) -> str | None:
        if source is not None:
            try:
                JoinPolicy(source)
            except ExpressionError as exc:
                raise ValueError(str(exc)) from exc
        return source


# Identities and contexts


@dataclass(frozen=True)
class Identity:
    """Who a connection is: verified claims, or anonymous.

    ``expires_at`` is the Unix time at which the connection must end (the
    token's ``exp`` plus the leeway), or None when it never has to.

    """

    claims: Mapping[str, Any] | None = None
    expires_at: float | None = None

    @property
    def anonymous(self) -> bool:
        return self.claims is None

    @property
    def subject(self) -> str | None:
        """The ``sub`` claim, or None."""
        if self.claims is None:
            return None
        sub = self.claims.get("sub")
        return sub if isinstance(sub, str) else None


ANONYMOUS = Identity()
"""The identity of a client that brought no token."""


def build_context(
    params: Mapping[str, Any],
    identity: Identity | None = None,
    extra: Mapping[str, Any] | None = None,
    *,
    drop: Sequence[str] = (),
) -> dict[str, Any]:
    """A subscriber's ``context``: ``{"params": ..., "user": ..., **extra}``.

    ``params`` are what the client wrote (query string, ``connection_init``
    payload, ...), minus the names in ``drop`` (the token's parameter, so
    that it reaches no filter, flow or log). ``user`` holds the verified
    claims and is *absent* for anonymous clients, so that a filter on
    ``context.user`` fails closed for them. ``extra`` (the connection id,
    say) may not use the keys ``params`` or ``user``: the claims and the
    client's parameters live under keys of their own, and nothing the
    client sends can land on ``user``.

    """
    reserved = {"params", "user"} & set(extra or ())
    if reserved:
        raise ValueError(f"extra context cannot set {sorted(reserved)[0]!r}")
    context: dict[str, Any] = {
        "params": {k: v for k, v in params.items() if k not in drop}
    }
    if identity is not None and identity.claims is not None:
        context["user"] = dict(identity.claims)
    context.update(extra or {})
    return context


_DEFAULT_PORTS = {"http": 80, "ws": 80, "https": 443, "wss": 443}


def _origin_parts(origin: str) -> tuple[str, str, int] | None:
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme = parts.scheme.lower()
    host = (parts.hostname or "").lower()
    if not scheme or not host:
        return None
    if port is None:
        port = _DEFAULT_PORTS.get(scheme, -1)
    return scheme, host, port


def check_origin(origin: str | None, allowed: Sequence[str]) -> bool:
    """Whether a browser at ``origin`` may connect.

    ``allowed`` holds origins (``"https://app.example.com"``), ``"*"`` for
    any, or ``"https://*.example.com"`` for any subdomain (not the apex).
    Scheme and host compare case-insensitively and a default port equals
    no port, so ``https://App.example.com:443`` is ``https://app.example.com``.
    A request without ``Origin`` does not come from a browser page and is
    allowed: the check protects browser users from other sites' pages, it
    does not authenticate (any other client can send any ``Origin``). The
    literal origin ``"null"`` (sandboxed frames, ``file:``) passes only when
    listed.

    """
    if origin is None:
        return True
    if "*" in allowed:
        return True
    if origin.strip() == "null":
        return "null" in allowed
    got = _origin_parts(origin)
    if got is None:
        return False
    for entry in allowed:
        wildcard = "://*." in entry
        want = _origin_parts(entry.replace("://*.", "://", 1) if wildcard else entry)
        if want is None or want[0] != got[0] or want[2] != got[2]:
            continue
        if got[1] == want[1] and not wildcard:
            return True
        if wildcard and got[1].endswith("." + want[1]):
            return True
    return False


# Room joins


class JoinPolicy:
    """The ``join_if`` condition: may this connection join this room?

    ``room`` (the room's name) and ``context`` (the connection's) are in
    scope, with CEL's string extensions (``split``, ``lowerAscii``,
    ``substring``, ...), so the condition can take a room apart:
    ``context.user.tenant == room.split(':')[0]``. A condition whose
    evaluation fails (an anonymous client has no ``context.user``) refuses
    the join: it fails closed. An equality between a ``context`` path and a
    plain path or literal compares text, as in filters; other comparisons
    are CEL's, strictly typed.

    """

    __slots__ = ("_expression", "source")

    def __init__(self, source: str) -> None:
        if not isinstance(source, str) or not source.strip():
            raise ExpressionError("join_if must be a non-empty expression")
        self.source = source
        # Only known names and functions: a typo is an error at start, not
        # a refused join.
        self._expression = Expression(source, names=("context", "room"))

    def allows(self, context: Mapping[str, Any], room: str) -> bool:
        """True only when the condition evaluates to exactly ``true``."""
        try:
            result = self._expression.evaluate({"context": dict(context), "room": room})
        except ExpressionError as exc:
            logger.debug("join_if %r failed for room %r: %s", self.source, room, exc)
            return False
        return result is True

    def __repr__(self) -> str:
        return f"JoinPolicy({self.source!r})"


# Keys


@dataclass(frozen=True)
class _Key:
    key: Any  # a cryptography public key, or the HMAC secret as bytes
    algorithms: tuple[str, ...]


def _algorithms_for(key: Any) -> tuple[str, ...]:
    """Algorithms a public key can verify, the implied one first."""
    if isinstance(key, rsa.RSAPublicKey):
        return _RSA
    if isinstance(key, ec.EllipticCurvePublicKey):
        name = _CURVES.get(key.curve.name)
        return (name,) if name else ()
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return ("EdDSA",)
    return ()


def _kind(key: Any) -> str:
    if isinstance(key, rsa.RSAPublicKey):
        return "an RSA public key"
    if isinstance(key, ec.EllipticCurvePublicKey):
        return f"an EC public key on {key.curve.name}"
    if isinstance(key, ed25519.Ed25519PublicKey | ed448.Ed448PublicKey):
        return "an EdDSA public key"
    return f"a key of type {type(key).__name__}"


def _fit(
    key: Any, configured: list[str] | None, implied: str | None, where: str
) -> _Key:
    """Pair a public key with the configured algorithms it can verify."""
    usable = _algorithms_for(key)
    if not usable:
        raise ConnectorError(f"{where}: {_kind(key)} cannot verify JWTs")
    # A JWK's own alg narrows what it verifies, and must fit its type.
    if implied is not None:
        usable = tuple(a for a in usable if a == implied)
        if not usable:
            raise ConnectorError(f"{where}: {_kind(key)} cannot verify {implied}")
    if configured is None:
        chosen = usable[:1]
    else:
        chosen = tuple(a for a in configured if a in usable)
    if not chosen:
        wanted = ", ".join(configured or ())
        raise ConnectorError(f"{where}: {_kind(key)} cannot verify {wanted}")
    return _Key(key, chosen)


def _public_key(text: str, where: str) -> Any:
    data = text.encode()
    try:
        if b"-----BEGIN CERTIFICATE" in data:
            return load_pem_x509_certificate(data).public_key()
        return load_pem_public_key(data)
    except ValueError as exc:
        if b"PRIVATE KEY" in data:
            raise ConnectorError(
                f"{where} holds a private key; give its public key "
                "(openssl pkey -pubout)"
            ) from exc
        raise ConnectorError(f"{where} is not a PEM public key or certificate") from exc


def _read(path: Path, what: str) -> str:
    try:
        return path.read_text()
    except OSError as exc:
        raise ConnectorError(
            f"cannot read {what} {str(path)!r}: {exc.strerror}"
        ) from exc


def _load_jwks(path: Path, configured: list[str] | None) -> dict[str | None, _Key]:
    """The signing keys of a JWKS file by kid (None for a key without one).

    Keys marked for encryption are ignored, and so are keys that can verify
    none of the configured algorithms (with a warning); symmetric and
    private keys are refused, as is a file left with no key at all.

    """
    where = f"jwks_file {str(path)!r}"
    try:
        document = json.loads(_read(path, "jwks_file"))
        entries = document["keys"]
        if not isinstance(entries, list):
            raise TypeError("keys is not a list")
    except (ValueError, KeyError, TypeError) as exc:
        raise ConnectorError(f"{where} is not a JSON Web Key Set: {exc}") from exc
    keys: dict[str | None, _Key] = {}
    for entry in entries:
        kid = entry.get("kid") if isinstance(entry, dict) else None
        name = f"{where}, key {kid!r}"
        if not isinstance(entry, dict) or entry.get("use", "sig") != "sig":
            continue  # encryption keys and junk are not ours to judge
        if entry.get("kty") not in ("RSA", "EC", "OKP"):
            raise ConnectorError(
                f"{name} has kty {entry.get('kty')!r}; only public keys "
                "(RSA, EC, OKP) verify tokens here"
            )
        if "d" in entry:
            raise ConnectorError(f"{name} is a private key; publish public keys only")
        try:
            key = jwt.PyJWK(entry).key
        except jwt.PyJWTError as exc:
            raise ConnectorError(f"{name} cannot be loaded: {exc}") from exc
        try:
            keys[kid] = _fit(key, configured, entry.get("alg"), name)
        except ConnectorError as exc:
            logger.warning("ignoring a key: %s", exc)
    if not keys:
        raise ConnectorError(f"{where} holds no signing keys")
    return keys


# Verification

_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.ExpiredSignatureError, "token expired"),
    (jwt.ImmatureSignatureError, "token not yet valid"),
    (jwt.InvalidAudienceError, "wrong audience"),
    (jwt.InvalidIssuerError, "wrong issuer"),
    (jwt.InvalidAlgorithmError, "algorithm not allowed"),
    (jwt.InvalidSignatureError, "bad signature"),
)


def _reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return f"missing claim {exc.claim!r}"
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "malformed token"


class Authenticator:
    """Verifies tokens for one connector's ``auth`` block.

    Keys are loaded once, here: relative paths are resolved against
    ``base_dir`` (the configuration directory). A key that cannot be read,
    or cannot verify the configured algorithms, raises
    :class:`~mycel.ConnectorError`; a ``join_if`` that does not compile
    raises :class:`~mycel.ExpressionError`.

    """

    def __init__(self, settings: AuthSettings, base_dir: str | Path = ".") -> None:
        self.settings = settings
        self.join_policy = JoinPolicy(settings.join_if) if settings.join_if else None
        jwt_settings = settings.jwt
        base = Path(base_dir)
        configured = jwt_settings.algorithms

        # One key, or several picked by kid.
        self._keys: dict[str | None, _Key] = {}
        if jwt_settings.secret is not None:
            secret = jwt_settings.secret.get_secret_value().encode()
            self._keys[None] = _Key(secret, tuple(configured or ["HS256"]))
        elif jwt_settings.public_key is not None:
            text = jwt_settings.public_key
            where = "public_key"
            if "-----BEGIN" not in text:
                path = base / text
                where = f"public_key {str(path)!r}"
                text = _read(path, "public_key")
            self._keys[None] = _fit(_public_key(text, where), configured, None, where)
        elif jwt_settings.jwks_file is not None:
            self._keys = _load_jwks(base / jwt_settings.jwks_file, configured)
        self._all_algorithms = sorted(
            {a for k in self._keys.values() for a in k.algorithms}
        )
        self._required = list(jwt_settings.required_claims)

    # Finding the token

    def token_from(
        self,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        cookies: Mapping[str, str] | None = None,
        payload: Mapping[str, Any] | None = None,
    ) -> str | None:
        """The token a client presents, or None.

        Looked for in this order: the ``header`` (``Bearer TOKEN``; another
        scheme counts as no token), the ``cookie``, the ``query_param``,
        then the graphql-ws ``connection_init`` ``payload`` (its
        ``connection_param`` key, or a key named like ``header``). The
        first one present wins. Header names compare case-insensitively.

        """
        settings = self.settings
        if settings.header and headers:
            token = _bearer(_get_folded(headers, settings.header))
            if token:
                return token
        if settings.cookie and cookies:
            token = cookies.get(settings.cookie, "").strip()
            if token:
                return token
        if settings.query_param and query:
            token = query.get(settings.query_param, "").strip()
            if token:
                return token
        if payload:
            if settings.connection_param:
                value = payload.get(settings.connection_param)
                if isinstance(value, str) and value.strip():
                    return _bearer(value) or value.strip()
            if settings.header:
                value = _get_folded(payload, settings.header)
                token = _bearer(value) if isinstance(value, str) else None
                if token:
                    return token
        return None

    # Verifying it

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid token; :class:`AuthError` otherwise."""
        jwt_settings = self.settings.jwt
        key = self._keys.get(None)
        if key is None:
            # A JWKS: the header's kid picks the key. (With one key, PyJWT's
            # own algorithm check below refuses what the key may not verify,
            # and the token is parsed once instead of twice.)
            try:
                header = jwt.get_unverified_header(token)
            except jwt.PyJWTError as exc:
                raise self._refuse("malformed token") from exc
            algorithm = header.get("alg")
            if not isinstance(algorithm, str) or algorithm not in self._all_algorithms:
                raise self._refuse("algorithm not allowed")
            key = self._key_for(header.get("kid"))
            if key is None:
                raise self._refuse("unknown key")
            if algorithm not in key.algorithms:
                raise self._refuse("algorithm not allowed")
        try:
            claims: dict[str, Any] = jwt.decode(
                token,
                key.key,
                algorithms=list(key.algorithms),
                audience=jwt_settings.audience,
                issuer=jwt_settings.issuer,
                leeway=jwt_settings.leeway,
                options={"require": self._required},
            )
        except jwt.PyJWTError as exc:
            raise self._refuse(_reason(exc)) from exc
        return claims

    def _key_for(self, kid: Any) -> _Key | None:
        # A secret or a public_key is stored under None and ignores kid; a
        # JWKS key is picked by kid, or is the only one when there is no kid.
        if None in self._keys:
            return self._keys[None]
        if kid is None and len(self._keys) == 1:
            return next(iter(self._keys.values()))
        return self._keys.get(kid) if isinstance(kid, str) else None

    @staticmethod
    def _refuse(reason: str) -> AuthError:
        logger.debug("token refused: %s", reason)
        return AuthError(reason)

    def expires_at(self, claims: Mapping[str, Any]) -> float | None:
        """Unix time a connection with these claims must end: ``exp`` plus
        the leeway, or None without ``exp``."""
        exp = claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            return None
        if not math.isfinite(exp):
            return None
        return float(exp) + self.settings.jwt.leeway

    def authenticate(
        self,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        cookies: Mapping[str, str] | None = None,
        payload: Mapping[str, Any] | None = None,
    ) -> Identity:
        """Who the client is.

        A present token must be valid, whether or not auth is ``required``:
        a bad token is refused rather than quietly treated as anonymous.
        Without a token the client is anonymous, or refused ("token
        missing") when ``required``.

        """
        token = self.token_from(headers, query, cookies, payload)
        if token is None:
            if self.settings.required:
                raise AuthError("token missing", missing=True)
            return ANONYMOUS
        claims = self.verify(token)
        return Identity(claims, self.expires_at(claims))

    def refresh(self, identity: Identity, token: str) -> Identity:
        """Extend a connection's life with a fresh token sent in-band.

        The token must be valid and name the same identity: every claim but
        ``exp``, ``iat``, ``nbf``, ``jti`` and ``auth_time`` equal to the
        connection's. The identity returned keeps the connection's claims
        and takes the new expiry; ``context.user`` stays as it was, so the
        hub's filter indexes stay right. To change claims, reconnect.

        """
        if identity.claims is None:
            raise AuthError(
                "anonymous connections cannot authenticate later; reconnect"
            )
        claims = self.verify(token)
        if _identity_claims(claims) != _identity_claims(identity.claims):
            raise self._refuse("token is for another identity")
        return Identity(identity.claims, self.expires_at(claims))

    # Contexts and joins

    def build_context(
        self,
        params: Mapping[str, Any],
        identity: Identity | None,
        extra: Mapping[str, Any] | None = None,
    ) -> dict[str, Any]:
        """:func:`build_context` without the token's query parameter."""
        drop = [self.settings.query_param] if self.settings.query_param else []
        return build_context(params, identity, extra, drop=drop)

    def may_join(self, context: Mapping[str, Any], room: str) -> bool:
        """Whether ``join_if`` lets this connection into ``room``."""
        return self.join_policy is None or self.join_policy.allows(context, room)


def _identity_claims(claims: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in claims.items() if k not in _TIME_CLAIMS}


def _get_folded(mapping: Mapping[str, Any], name: str) -> Any:
    value = mapping.get(name)
    if value is not None:
        return value
    folded = name.lower()
    for key, value in mapping.items():
        if key.lower() == folded:
            return value
    return None


def _bearer(value: Any) -> str | None:
    if not isinstance(value, str):
        return None
    scheme, _, token = value.strip().partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


class ExpiryTimer:
    """Calls ``on_expired`` once, when a connection's token runs out.

    ``schedule(identity)`` (again after every refresh) replaces the timer;
    an identity without expiry cancels it. ``cancel()`` when the connection
    ends. Runs on the event loop; the callback must not block (close the
    socket from a task it creates, for example).

    """

    __slots__ = ("_handle", "_on_expired")

    def __init__(self, on_expired: Callable[[], object]) -> None:
        self._on_expired = on_expired
        self._handle: asyncio.TimerHandle | None = None

    def schedule(self, identity: Identity) -> None:
        self.cancel()
        if identity.expires_at is None:
            return
        delay = max(0.0, identity.expires_at - time.time())
        loop = asyncio.get_running_loop()
        self._handle = loop.call_later(delay, self._fire)

    def _fire(self) -> None:
        self._handle = None
        self._on_expired()

    @property
    def pending(self) -> bool:
        return self._handle is not None

    def cancel(self) -> None:
        if self._handle is not None:
            self._handle.cancel()
            self._handle = None
